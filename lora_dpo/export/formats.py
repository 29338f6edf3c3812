"""Exporting a lora-dpo adapter to the layouts other tools read: diffusers, PEFT, and kohya (A1111 / ComfyUI).

The input is the file of :func:`lora_dpo.export.artifacts.save_lora_adapter`: keys ``<denoiser>.<module>.lora_A.weight``
(``unet.`` for SD1.x/2.x and SDXL, ``transformer.`` for SD3 and FLUX.1; files written by earlier versions spell the
UNet's attention projections ``.lora.down.weight``) and the PEFT ``LoraConfig`` in the header key
``lora_adapter_metadata``, read through :mod:`lora_dpo.models.lora_files` (safetensors only; an adapter of another
family than the export's is refused: :func:`lora_dpo.models.lora_files.check_adapter_family`).

kohya files of FLUX.1 use BFL's module names, where q, k, v (and, in the single blocks, the MLP input) are one fused
linear layer (:meth:`lora_dpo.models.families.flux.Flux.kohya_fused`): the export fuses the adapter's separate LoRAs
of those modules into one exact LoRA of the fused layer (:func:`fuse_lora_parts`), the layout ComfyUI and kohya
sd-scripts read and that diffusers' FLUX kohya reader splits back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from lora_dpo.errors import AdapterMismatchError
from lora_dpo.models.families import get_family
from lora_dpo.models.lora_files import (
    FAMILY_KEY,
    PEFT_WEIGHT_NAME,
    WEIGHT_NAME,
    check_adapter_family,
    family_mismatch,
    lora_metadata,
    read_lora_file,
    resolve_lora_file,
    save_safetensors,
)
from lora_dpo.models.pretrained import read_component_config

FORMATS = ("diffusers", "peft", "kohya")


def kohya_module_name(module: str, family: str, unet_config=None) -> str:
    """The kohya key stem of a diffusers denoiser module: ``lora_unet_`` + its name in kohya's model with ``.``
    replaced by ``_`` (:meth:`lora_dpo.models.families.base.ModelFamily.kohya_module_name`).

    kohya sd-scripts trains SD1.x on a UNet with the diffusers module names, so those stay; SDXL uses Stability's
    SGM names (:func:`lora_dpo.models.families.sdxl.sgm_name`: ``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``); FLUX.1 BFL's names (``transformer_blocks.0.attn.to_k`` ->
    ``lora_unet_double_blocks_0_img_attn_qkv``, the stem shared by q, k and v).

    Args:
        module: the module path in the diffusers denoiser (``down_blocks.1.attentions.0.proj_in``).
        family: the base's family (registry name: ``sd15``, ...).
        unet_config: the UNet config (``unet.config``, a dict, a ``config.json`` or a base model folder); SDXL only.
    Raises:
        ValueError: an unknown family; a module without a kohya name (the message names it); an SD3 module (SD3 has
            no kohya layout in this kit).
    """
    return get_family(family).kohya_module_name(module, unet_config)


def _read_adapter(adapter, family: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, dict]:
    """``{module: (lora_A, lora_B)}``, the ``LoraConfig`` dict and the header of a lora-dpo adapter file made for
    ``family`` (its keys under the family's ``denoiser_name`` prefix)."""
    file = resolve_lora_file(adapter)
    tensors, header = read_lora_file(file)
    spec = get_family(family)
    declared = check_adapter_family(file, tensors, header, family)  # another family's transformer: raises here
    if declared:  # another UNet family (the exported layout would not fit the base named)
        raise AdapterMismatchError(family_mismatch(file, [declared], f"its header says {FAMILY_KEY}={declared.name}",
                                                   spec))
    prefix = spec.denoiser_name
    config = lora_metadata(header, prefix)
    if config is None:
        raise ValueError(f"{file} has no {spec.label} LoRA config in its header (lora_adapter_metadata, "
                         f"{prefix}.r ...): its alpha is unknown. Pass a pytorch_lora_weights.safetensors written by "
                         "lora-dpo")
    outside = [k for k in tensors if not k.startswith(f"{prefix}.")]
    if outside:
        raise ValueError(f"only {spec.label} {prefix} LoRA weights can be exported; {outside[0]} is not one")
    pairs: dict[str, list] = {}
    for key, tensor in convert_unet_state_dict_to_peft(dict(tensors)).items():
        match = re.fullmatch(rf"{prefix}\.(.+)\.lora_([AB])\.weight", key)
        if not match:
            raise ValueError(f"unexpected key {key} in the adapter (expected <module>.lora_A/lora_B.weight)")
        pairs.setdefault(match[1], [None, None])["AB".index(match[2])] = tensor
    for module, (down, up) in pairs.items():
        if down is None or up is None:
            raise ValueError(f"the adapter lacks lora_A or lora_B of {module}")
    return {m: (a, b) for m, (a, b) in pairs.items()}, config, header


def _module_alpha(module: str, rank: int, config: dict) -> float:
    """kohya's ``alpha`` (scale = alpha / rank) giving the scale PEFT applies: lora_alpha (or the module's
    ``alpha_pattern`` entry) over r, or over sqrt(r) with ``use_rslora``."""
    patterns = config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(patterns.keys(), module), config["lora_alpha"]))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def fuse_lora_parts(parts: list[tuple[torch.Tensor, torch.Tensor, float] | None],
                    out_features: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA of a fused linear layer (BFL's ``qkv``, ``linear1``) from the LoRAs of the modules fused into it.

    A fused layer's output is its parts' outputs stacked (``[q; k; v]``), so the stacked update
    ``[s_1·B_1·A_1; ...; s_k·B_k·A_k]`` is exactly ``s · up @ down`` with ``down = cat(A_1, ..., A_k)`` (rows) and
    ``up`` block-diagonal (``B_i`` in the rows of part i and the columns of ``A_i``), ``s = alpha / rank``. Every part
    is padded to the largest part rank ρ with zero rows / columns (so rank = k·ρ and the blocks are equal: diffusers'
    kohya reader recognises the block-diagonal "sparse" up and splits it back into the k LoRAs); a part the adapter
    does not target (None) gets zero blocks. ``s`` is the first present part's scale and ``alpha = s·k·ρ`` (k·lora_alpha
    when every part has rank r and scale lora_alpha / r, so alpha / rank stays lora_alpha / r); a part with another
    scale ``s_i`` has its ``B_i`` multiplied by ``s_i / s``.

    Args:
        parts: per fused module, in the fused layer's order: ``(A (r_i, in), B (out_i, r_i), s_i)`` or None.
        out_features: per fused module, its output width (the rows of its block).
    Returns:
        ``(down (k·ρ, in), up (Σ out_i, k·ρ), alpha)``.
    Raises:
        ValueError: no part present, or parts with different input widths (they are not one fused layer).
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("a fused layer needs at least one LoRA part")
    fan_in = {a.shape[1] for a, _, _ in present}
    if len(fan_in) != 1:
        raise ValueError(f"the parts of a fused layer read inputs of different widths {sorted(fan_in)}")
    rho, scale = max(a.shape[0] for a, _, _ in present), present[0][2]
    like = present[0][0]
    k = len(parts)
    down = like.new_zeros(k * rho, like.shape[1])
    up = like.new_zeros(sum(out_features), k * rho)
    row = 0
    for i, (part, rows) in enumerate(zip(parts, out_features)):
        if part is not None:
            a, b, s = part
            if b.shape[0] != rows:
                raise ValueError(f"part {i} of a fused layer has {b.shape[0]} outputs, its layer {rows}")
            down[i * rho: i * rho + a.shape[0]] = a
            up[row: row + rows, i * rho: i * rho + b.shape[1]] = b if s == scale else b * (s / scale)
        row += rows
    return down, up, scale * k * rho


def _out_features(denoiser_config, family: str, modules: set[str]) -> dict[str, int]:
    """Output widths of denoiser ``modules``, from the denoiser built on the meta device from its config."""
    if not modules:
        return {}
    spec = get_family(family)
    config = read_component_config(denoiser_config, spec.denoiser_name)
    if not config:
        raise ValueError(f"this {spec.label} adapter leaves out part of a fused kohya layer (e.g. {min(modules)}): "
                         "pass the base model (--base, or unet_config=) so its width is known")
    with torch.device("meta"):
        denoiser = spec.denoiser_class.from_config(config)
    found = dict(denoiser.named_modules())
    return {m: found[m].out_features for m in modules}


def _kohya_state(pairs: dict, config: dict, family: str, unet_config) -> tuple[dict, list[float]]:
    """``{<stem>.lora_down.weight, .lora_up.weight, .alpha}`` and the stems' alphas; fused stems through
    :func:`fuse_lora_parts`."""
    spec = get_family(family)
    groups: dict[str, tuple[tuple[str, ...], dict[int, str]]] = {}
    for module in pairs:  # FLUX fuses several modules into one stem; the others name one module per stem
        stem, part, parts = spec.kohya_fused(module, unet_config)
        groups.setdefault(stem, (parts, {}))[1][part] = module
    untargeted = {p for parts, have in groups.values() if len(parts) > 1 for i, p in enumerate(parts) if i not in have}
    widths = _out_features(unet_config, family, untargeted)
    state, alphas = {}, []
    for stem, (parts, have) in groups.items():
        if len(parts) == 1:
            down, up = pairs[have[0]]
            alpha = _module_alpha(have[0], down.shape[0], config)
        else:
            lora, rows = [], []
            for i, name in enumerate(parts):
                if i in have:
                    a, b = pairs[name]
                    lora.append((a, b, _module_alpha(name, a.shape[0], config) / a.shape[0]))
                    rows.append(b.shape[0])
                else:
                    lora.append(None)
                    rows.append(widths[name])
            down, up, alpha = fuse_lora_parts(lora, rows)
        state.update({f"{stem}.lora_down.weight": down.contiguous(), f"{stem}.lora_up.weight": up.contiguous(),
                      f"{stem}.alpha": torch.tensor(alpha, dtype=torch.float32)})
        alphas.append(alpha)
    return state, alphas


def _save_kohya(pairs: dict, config: dict, target: Path, family: str, unet_config) -> Path:
    if config.get("use_dora"):
        raise ValueError("DoRA adapters have no kohya layout; export them as diffusers or peft")
    state, alphas = _kohya_state(pairs, config, family, unet_config)
    version, architecture = get_family(family).kohya_spec
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config["r"]),
                "ss_network_alpha": str(Counter(alphas).most_common(1)[0][0]), "ss_base_model_version": version,
                "modelspec.architecture": architecture, "modelspec.sai_model_spec": "1.0.0", FAMILY_KEY: family}
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(state, target, metadata)


def export_adapter(adapter: str | Path, out: str | Path, fmt: str, family: str, unet_config=None) -> Path:
    """Write a lora-dpo adapter in the layout ``fmt`` reads; returns the path of the main file written.

    ``<denoiser>`` below is the family's ``denoiser_name``: ``unet`` (SD1.x/2.x, SDXL) or ``transformer`` (SD3,
    FLUX.1).

    - ``diffusers``: ``out/pytorch_lora_weights.safetensors``, same tensors and header, all keys spelled
      ``<denoiser>.<module>.lora_A.weight``: diffusers converts ``.lora.down.weight`` only if the first key has it, so
      ``load_lora_weights`` silently drops part of a mixed file (e.g. all attention weights if ``proj_in`` is in).
    - ``peft``: ``out/adapter_config.json`` (written by ``peft.LoraConfig.save_pretrained``: r, lora_alpha,
      target_modules, exclude_modules, rank/alpha patterns) and ``out/adapter_model.safetensors`` with the keys of
      ``PeftModel.save_pretrained`` (``base_model.model.<module>.lora_A.weight``), for
      ``peft.PeftModel.from_pretrained(<DenoiserClass>.from_pretrained(base, subfolder="<denoiser>"), out)``
      (``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``).
    - ``kohya`` (sd-scripts, AUTOMATIC1111, ComfyUI, and ``pipe.load_lora_weights``): one file,
      ``out/<folder name>.safetensors`` or ``out`` itself if it ends in ``.safetensors``, keys
      ``<stem>.lora_down.weight`` (= lora_A), ``<stem>.lora_up.weight`` (= lora_B) and ``<stem>.alpha`` (0-dim,
      that module's alpha, so alpha / rank is PEFT's scale), with ``<stem>`` from :func:`kohya_module_name`; the
      header carries ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version``,
      ``modelspec.architecture``, ``modelspec.sai_model_spec`` and ``lora_dpo.family`` (strings). FLUX.1: BFL's
      names (``lora_unet_double_blocks_<i>_img_attn_qkv``, ``..._img_attn_proj``, ``..._txt_attn_qkv``,
      ``..._img_mlp_0``, ``lora_unet_single_blocks_<i>_linear1``, ``..._linear2``, ...); q, k, v (single blocks: and
      ``proj_mlp``) fused into one LoRA of rank k·r (:func:`fuse_lora_parts`). diffusers' reader
      (``FluxPipeline.lora_state_dict``) splits ``linear1`` at FLUX.1's fixed widths (3072, 3072, 3072, 12288), so it
      reads ``linear1`` of the real FLUX.1 only; ComfyUI and sd-scripts read the fused layer as it is.

    Args:
        adapter: the adapter file, or a folder holding ``pytorch_lora_weights.safetensors``.
        out: the output folder (created; existing files are overwritten), or the kohya file. The files written get
            the mode of a plain new file (``0o666`` less the umask), not safetensors' ``0600``.
        fmt: one of :data:`FORMATS`.
        family: the base's family (registry name: ``sd15``, ``sdxl``, ``sd3``, ``flux``).
        unet_config: the base denoiser's config (``unet.config`` / ``transformer.config``, a dict, its
            ``config.json`` or the base model folder); needed only for SDXL kohya names and for a FLUX kohya export
            of an adapter that targets only some of the modules of a fused layer (the zero blocks' widths).
    Raises:
        ValueError: an unknown ``fmt`` or ``family``; an adapter without its LoRA config in the header or with
            keys outside the family's denoiser; a kohya export of a module without a kohya name, of an SD3 adapter
            (no established SD3 kohya layout: the message names diffusers and peft) or of a DoRA adapter.
        AdapterMismatchError: the adapter was made for another family (:func:`lora_dpo.models.lora_files.check_adapter_family`).
        FileNotFoundError, lora_dpo.models.lora_files.UnsafeFileError: see :func:`lora_dpo.models.lora_files.resolve_lora_file`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    spec = get_family(family)  # an unknown family: ValueError before anything is read
    out = Path(out)
    if fmt == "kohya" and out.suffix == ".safetensors":
        target = out
    else:
        target = out / {"diffusers": WEIGHT_NAME, "peft": PEFT_WEIGHT_NAME, "kohya": f"{out.name}.safetensors"}[fmt]
    pairs, config, header = _read_adapter(adapter, family)
    if fmt == "kohya":
        return _save_kohya(pairs, config, target, family, unet_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{spec.denoiser_name}." if fmt == "diffusers" else "base_model.model."
    state = {f"{prefix}{m}.lora_{ab}.weight": t.contiguous() for m, pair in pairs.items() for ab, t in zip("AB", pair)}
    if fmt == "diffusers":
        return save_safetensors(state, target, header)
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}  # a header from another PEFT version
    LoraConfig(**{k: v for k, v in config.items() if k in known}).save_pretrained(str(out))
    return save_safetensors(state, target, {"format": "pt", FAMILY_KEY: family})

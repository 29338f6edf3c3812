"""Exporting a lora-dpo adapter to the layouts other tools read: diffusers, PEFT, and kohya (A1111 / ComfyUI).

The input is the file of :func:`lora_dpo.export.artifacts.save_lora_adapter`: keys ``unet.<module>.lora_A.weight`` (files
written by earlier versions spell the attention projections ``.lora.down.weight``) and the PEFT ``LoraConfig`` in the header key
``lora_adapter_metadata``, read through :mod:`lora_dpo.models.lora_files` (safetensors only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_dpo.export.artifacts import WEIGHT_NAME
from lora_dpo.models.lora_files import PEFT_WEIGHT_NAME, lora_metadata, read_lora_file, resolve_lora_file

FORMATS = ("diffusers", "peft", "kohya")
KOHYA_SPEC = {  # family -> (ss_base_model_version, modelspec.architecture)
    "sd15": ("sd_v1", "stable-diffusion-v1/lora"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
}
# Diffusers module -> Stability (SGM / "ldm") module of the SDXL UNet, outside the down/mid/up blocks and inside a
# resnet. Checked against diffusers' single-file SDXL converter (``convert_ldm_unet_checkpoint``) and its kohya
# LoRA reader (``_maybe_map_sgm_blocks_to_diffusers``, ``_convert_unet_lora_key``).
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_BLOCK = re.compile(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(attentions|resnets|downsamplers|upsamplers)"
                    r"\.(\d+)\.(.+)")


def _config(unet_config) -> dict:
    """The UNet config as a dict: a mapping (``unet.config``), a ``config.json``, or a base model folder."""
    if unet_config is None or isinstance(unet_config, Mapping):
        return dict(unet_config or {})
    path = Path(unet_config)
    path = path / "unet" / "config.json" if (path / "unet").is_dir() else path
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def _sgm_name(module: str, cfg: dict) -> str:
    """The SGM name of a diffusers SDXL UNet module (``down_blocks.1.attentions.0.X`` -> ``input_blocks.4.1.X``)."""
    if module in _SGM_TOP:
        return _SGM_TOP[module]
    match = _BLOCK.fullmatch(module)
    per = cfg.get("layers_per_block")
    if not match or not isinstance(per, int):
        raise ValueError(f"cannot map the UNet module {module!r} to a kohya SDXL name (layers_per_block={per})")
    kind, block, part, layer, inner = match.groups()
    block, layer, stride = int(block or 0), int(layer), per + 1
    if part == "resnets":
        if inner not in _SGM_RESNET:
            raise ValueError(f"cannot map the UNet module {module!r} to a kohya SDXL name (unknown resnet part)")
        inner = _SGM_RESNET[inner]
    if kind == "mid_block":  # middle_block.0 = resnets.0, .1 = attentions.0, .2 = resnets.1
        return f"middle_block.{1 if part == 'attentions' else 2 * layer}.{inner}"
    if kind == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{(block + 1) * stride}.0.{'op' if inner == 'conv' else inner}"
        return f"input_blocks.{1 + block * stride + layer}.{1 if part == 'attentions' else 0}.{inner}"
    if part == "upsamplers":  # after the resnet and, in a cross-attention block, the transformer
        slot = 2 if "CrossAttn" in cfg.get("up_block_types", ("",) * (block + 1))[block] else 1
        return f"output_blocks.{block * stride + per}.{slot}.{inner}"
    return f"output_blocks.{block * stride + layer}.{1 if part == 'attentions' else 0}.{inner}"


def kohya_module_name(module: str, family: str, unet_config=None) -> str:
    """The kohya key stem of a diffusers UNet module: ``lora_unet_`` + its name with ``.`` replaced by ``_``.

    kohya sd-scripts trains SD1.x on a UNet with the diffusers module names, so those stay; SDXL uses Stability's
    SGM names (L = ``layers_per_block``): ``down_blocks.d.{attentions,resnets}.l`` -> ``input_blocks.{1 + d(L+1) +
    l}.{1,0}``, ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1`` -> ``middle_block.0`` / ``.1`` / ``.2``,
    ``up_blocks.u.{attentions,resnets}.l`` -> ``output_blocks.{u(L+1) + l}.{1,0}``; inside a transformer nothing
    changes, inside a resnet ``conv1``/``conv2``/``time_emb_proj``/``conv_shortcut`` -> ``in_layers.2``/
    ``out_layers.3``/``emb_layers.1``/``skip_connection``; ``downsamplers.0.conv`` -> ``input_blocks.{(d+1)(L+1)}.0.op``,
    ``upsamplers.0.conv`` -> ``output_blocks.{u(L+1) + L}.2.conv`` (``.1.conv`` in a block without attention, which
    diffusers' reader misreads; SDXL has none); plus ``conv_in``, ``conv_out``, ``time_embedding``, ``add_embedding``.

    Args:
        module: the module path in the diffusers UNet (``down_blocks.1.attentions.0.proj_in``).
        family: ``sd15`` or ``sdxl``.
        unet_config: the UNet config (``unet.config``, a dict, a ``config.json`` or a base model folder); SDXL only.
    Raises:
        ValueError: an unknown family, or an SDXL module without an SGM name (the message names it).
    """
    if family not in KOHYA_SPEC:
        raise ValueError(f"family must be one of {tuple(KOHYA_SPEC)}, not {family!r}")
    name = module if family == "sd15" else _sgm_name(module, _config(unet_config))
    return "lora_unet_" + name.replace(".", "_")


def _read_adapter(adapter) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, dict]:
    """``{module: (lora_A, lora_B)}``, the ``LoraConfig`` dict and the header of a lora-dpo adapter file."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    tensors, header = read_lora_file(adapter)
    config = lora_metadata(header)
    if config is None:
        raise ValueError(f"{resolve_lora_file(adapter)} has no LoRA config in its header (lora_adapter_metadata): "
                         "its alpha is unknown. Pass a pytorch_lora_weights.safetensors written by lora-dpo")
    outside = [k for k in tensors if not k.startswith("unet.")]
    if outside:
        raise ValueError(f"only UNet LoRA weights can be exported; {outside[0]} is not one")
    pairs: dict[str, list] = {}
    for key, tensor in convert_unet_state_dict_to_peft(dict(tensors)).items():
        match = re.fullmatch(r"unet\.(.+)\.lora_([AB])\.weight", key)
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
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(patterns.keys(), module), config["lora_alpha"]))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _save_kohya(pairs: dict, config: dict, target: Path, family: str, unet_config) -> Path:
    if config.get("use_dora"):
        raise ValueError("DoRA adapters have no kohya layout; export them as diffusers or peft")
    state, alphas = {}, []
    for module, (down, up) in pairs.items():
        stem = kohya_module_name(module, family, unet_config)
        alpha = _module_alpha(module, down.shape[0], config)
        state.update({f"{stem}.lora_down.weight": down.contiguous(), f"{stem}.lora_up.weight": up.contiguous(),
                      f"{stem}.alpha": torch.tensor(alpha, dtype=torch.float32)})
        alphas.append(alpha)
    from safetensors.torch import save_file

    version, architecture = KOHYA_SPEC[family]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config["r"]),
                "ss_network_alpha": str(Counter(alphas).most_common(1)[0][0]), "ss_base_model_version": version,
                "modelspec.architecture": architecture, "modelspec.sai_model_spec": "1.0.0"}
    save_file(state, str(target), metadata=metadata)
    return target


def export_adapter(adapter: str | Path, out: str | Path, fmt: str, family: str, unet_config=None) -> Path:
    """Write a lora-dpo adapter in the layout ``fmt`` reads; returns the path of the main file written.

    - ``diffusers``: ``out/pytorch_lora_weights.safetensors``, same tensors and header, all keys spelled
      ``unet.<module>.lora_A.weight``: diffusers converts ``.lora.down.weight`` only if the first key has it, so
      ``load_lora_weights`` silently drops part of a mixed file (e.g. all attention weights if ``proj_in`` is in).
    - ``peft``: ``out/adapter_config.json`` (written by ``peft.LoraConfig.save_pretrained``: r, lora_alpha,
      target_modules, rank/alpha patterns) and ``out/adapter_model.safetensors`` with the keys of
      ``PeftModel.save_pretrained`` (``base_model.model.<module>.lora_A.weight``), for
      ``peft.PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), out)``.
    - ``kohya`` (sd-scripts, AUTOMATIC1111, ComfyUI, and ``pipe.load_lora_weights``): one file,
      ``out/<folder name>.safetensors`` or ``out`` itself if it ends in ``.safetensors``, keys
      ``<stem>.lora_down.weight`` (= lora_A), ``<stem>.lora_up.weight`` (= lora_B) and ``<stem>.alpha`` (0-dim,
      that module's alpha, so alpha / rank is PEFT's scale), with ``<stem>`` from :func:`kohya_module_name`; the
      header carries ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version``,
      ``modelspec.architecture`` and ``modelspec.sai_model_spec`` (strings).

    Args:
        adapter: the adapter file, or a folder holding ``pytorch_lora_weights.safetensors``.
        out: the output folder (created; existing files are overwritten), or the kohya file.
        fmt: one of :data:`FORMATS`.
        family: ``sd15`` or ``sdxl``.
        unet_config: the base UNet's config (``unet.config``, a dict, its ``config.json`` or the base model
            folder); needed only for SDXL kohya names.
    Raises:
        ValueError: an unknown ``fmt`` or ``family``; an adapter without its LoRA config in the header or with
            non-UNet keys; a kohya export of a module without a kohya name or of a DoRA adapter.
        FileNotFoundError, lora_dpo.models.lora_files.UnsafeFileError: see :func:`lora_dpo.models.lora_files.resolve_lora_file`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if family not in KOHYA_SPEC:
        raise ValueError(f"family must be one of {tuple(KOHYA_SPEC)}, not {family!r}")
    out = Path(out)
    if fmt == "kohya" and out.suffix == ".safetensors":
        target = out
    else:
        target = out / {"diffusers": WEIGHT_NAME, "peft": PEFT_WEIGHT_NAME, "kohya": f"{out.name}.safetensors"}[fmt]
    pairs, config, header = _read_adapter(adapter)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        return _save_kohya(pairs, config, target, family, unet_config)
    from peft import LoraConfig
    from safetensors.torch import save_file

    prefix = "unet." if fmt == "diffusers" else "base_model.model."
    state = {f"{prefix}{m}.lora_{ab}.weight": t.contiguous() for m, pair in pairs.items() for ab, t in zip("AB", pair)}
    if fmt == "diffusers":
        save_file(state, str(target), metadata=header)
        return target
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}  # a header from another PEFT version
    LoraConfig(**{k: v for k, v in config.items() if k in known}).save_pretrained(str(out))
    save_file(state, str(target), metadata={"format": "pt"})
    return target

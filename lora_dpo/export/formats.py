"""Exporting a lora-dpo adapter to the layouts other tools read: diffusers, PEFT, and kohya (A1111 / ComfyUI).

The input is the file of :func:`lora_dpo.export.artifacts.save_lora_adapter`: keys ``unet.<module>.lora_A.weight`` (files
written by earlier versions spell the attention projections ``.lora.down.weight``) and the PEFT ``LoraConfig`` in the header key
``lora_adapter_metadata``, read through :mod:`lora_dpo.models.lora_files` (safetensors only).
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

from lora_dpo.models.families import get_family
from lora_dpo.models.lora_files import (
    PEFT_WEIGHT_NAME,
    WEIGHT_NAME,
    lora_metadata,
    read_lora_file,
    resolve_lora_file,
    save_safetensors,
)

FORMATS = ("diffusers", "peft", "kohya")


def kohya_module_name(module: str, family: str, unet_config=None) -> str:
    """The kohya key stem of a diffusers UNet module: ``lora_unet_`` + its name in kohya's UNet with ``.`` replaced
    by ``_`` (:meth:`lora_dpo.models.families.base.ModelFamily.kohya_module_name`).

    kohya sd-scripts trains SD1.x on a UNet with the diffusers module names, so those stay; SDXL uses Stability's
    SGM names (:func:`lora_dpo.models.families.sdxl.sgm_name`: ``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``).

    Args:
        module: the module path in the diffusers UNet (``down_blocks.1.attentions.0.proj_in``).
        family: the base's family (registry name: ``sd15``, ...).
        unet_config: the UNet config (``unet.config``, a dict, a ``config.json`` or a base model folder); SDXL only.
    Raises:
        ValueError: an unknown family, or an SDXL module without an SGM name (the message names it).
    """
    return get_family(family).kohya_module_name(module, unet_config)


def _read_adapter(adapter) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, dict]:
    """``{module: (lora_A, lora_B)}``, the ``LoraConfig`` dict and the header of a lora-dpo adapter file."""
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
    version, architecture = get_family(family).kohya_spec
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config["r"]),
                "ss_network_alpha": str(Counter(alphas).most_common(1)[0][0]), "ss_base_model_version": version,
                "modelspec.architecture": architecture, "modelspec.sai_model_spec": "1.0.0"}
    return save_safetensors(state, target, metadata)


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
        out: the output folder (created; existing files are overwritten), or the kohya file. The files written get
            the mode of a plain new file (``0o666`` less the umask), not safetensors' ``0600``.
        fmt: one of :data:`FORMATS`.
        family: the base's family (registry name: ``sd15``, ...).
        unet_config: the base UNet's config (``unet.config``, a dict, its ``config.json`` or the base model
            folder); needed only for SDXL kohya names.
    Raises:
        ValueError: an unknown ``fmt`` or ``family``; an adapter without its LoRA config in the header or with
            non-UNet keys; a kohya export of a module without a kohya name or of a DoRA adapter.
        FileNotFoundError, lora_dpo.models.lora_files.UnsafeFileError: see :func:`lora_dpo.models.lora_files.resolve_lora_file`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    get_family(family)  # an unknown family: ValueError before anything is read
    out = Path(out)
    if fmt == "kohya" and out.suffix == ".safetensors":
        target = out
    else:
        target = out / {"diffusers": WEIGHT_NAME, "peft": PEFT_WEIGHT_NAME, "kohya": f"{out.name}.safetensors"}[fmt]
    pairs, config, header = _read_adapter(adapter)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        return _save_kohya(pairs, config, target, family, unet_config)
    prefix = "unet." if fmt == "diffusers" else "base_model.model."
    state = {f"{prefix}{m}.lora_{ab}.weight": t.contiguous() for m, pair in pairs.items() for ab, t in zip("AB", pair)}
    if fmt == "diffusers":
        return save_safetensors(state, target, header)
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}  # a header from another PEFT version
    LoraConfig(**{k: v for k, v in config.items() if k in known}).save_pretrained(str(out))
    return save_safetensors(state, target, {"format": "pt"})

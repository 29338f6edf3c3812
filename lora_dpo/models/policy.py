"""The trained UNet (the policy) and its DPO reference, in the two training modes: the one place they differ.

- ``train.mode: lora``: policy = the base UNet + a fresh LoRA adapter (fp32); reference = the same UNet with the
  adapter disabled (:func:`lora_dpo.models.adapters.adapters_disabled`). One UNet in memory; exact while the adapter
  starts at zero. With ``lora.init_from`` the policy starts from that LoRA and the reference is a frozen copy of it,
  a second adapter on the same UNet (:func:`lora_dpo.models.adapters.add_lora_from`).
- ``train.mode: full``: policy = the whole UNet, trained in fp32 (the master weights; mixed precision runs the
  forward under autocast); reference = a frozen copy of the UNet taken before the first step, in
  ``reference.dtype``, optionally kept in CPU memory (``reference.offload``). This is the shape of the official
  Diffusion-DPO code (Wallace et al. 2023, §5; ``ref_unet``).

Everything else (data, loss, metrics, checkpoints, resume) is shared; the training loop only asks a
:class:`Policy` for its parameters, its reference and its trainable state;
:func:`lora_dpo.export.artifacts.export_policy` writes what it exports.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import cpu_offload

from lora_dpo.models.adapters import (
    REFERENCE_ADAPTER,
    adapter_active,
    adapters_disabled,
    add_lora,
    add_lora_from,
    load_lora_state_dict,
    lora_state_dict,
)
from lora_dpo.models.lora_files import resolve_lora_file
from lora_dpo.models.pretrained import DTYPES

log = logging.getLogger(__name__)


def frozen_copy(unet: torch.nn.Module, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    """A frozen copy of a diffusers UNet, built directly in ``dtype`` on ``device`` (no grad, in ``unet``'s mode).

    The copy is made on the meta device and filled with cast copies of ``unet``'s tensors, so no transient second
    fp32 copy is ever allocated. It shares no storage with ``unet``: training the original leaves it unchanged.
    It keeps ``unet``'s train/eval mode: some CPU kernels (channels-last inputs) round differently in the two
    modes, and the reference must compute exactly what the untrained policy computes (u = 0 at step 0), as the
    disabled-adapter reference of LoRA mode does, being the same module. SD UNets have no dropout.

    Raises:
        RuntimeError: a tensor of the copy was not filled (a buffer outside the state dict).
    """
    with torch.device("meta"):
        copy = type(unet).from_config(unet.config)
    state = {
        name: t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        for name, t in unet.state_dict().items()
    }
    copy.load_state_dict(state, strict=True, assign=True)
    unfilled = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if unfilled:
        raise RuntimeError(f"frozen_copy left tensors unfilled: {unfilled[:3]}")
    return copy.requires_grad_(False).train(unet.training)


@dataclass
class Policy:
    """What the training loop trains, and the reference it is compared against.

    Attributes:
        mode: ``"lora"`` or ``"full"``.
        unet: the trained UNet (the module, not an accelerate/DDP wrapper of it).
        params: its trainable parameters, fp32 (LoRA A/B matrices, or every UNet parameter).
        frozen_reference: full mode's frozen copy; None in LoRA mode and for ``loss.type=sft`` (no reference).
        reference_autocast: ``(device type, dtype)`` to run the frozen copy under when its dtype is not the one
            mixed precision computes in (e.g. a bf16 copy under an fp32 policy); None otherwise.
        reference_adapter: LoRA mode started from an existing LoRA: the name of its frozen copy on ``unet``
            (the reference pass activates it); None for a fresh adapter (the reference pass disables adapters).
    """

    mode: str
    unet: torch.nn.Module
    params: list[torch.nn.Parameter]
    frozen_reference: torch.nn.Module | None = None
    reference_autocast: tuple[str, torch.dtype] | None = None
    reference_adapter: str | None = None

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The reference UNet inside the block: the adapter-disabled UNet, the UNet with the frozen starting LoRA
        active (both restored on exit), or the frozen copy.

        Use it under ``torch.no_grad()``. Raises RuntimeError when the policy was built without a reference.
        """
        if self.reference_adapter is not None:
            with adapter_active(self.unet, self.reference_adapter) as unet:
                yield unet
        elif self.mode == "lora":
            with adapters_disabled(self.unet) as unet:
                yield unet
        elif self.frozen_reference is None:
            raise RuntimeError("this policy was built without a reference (loss.type=sft needs none)")
        elif self.reference_autocast is None:
            yield self.frozen_reference
        else:
            with torch.autocast(self.reference_autocast[0], dtype=self.reference_autocast[1]):
                yield self.frozen_reference

    def trainable_state_dict(self, full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trained weights for a checkpoint: the adapter (PEFT names) or the whole UNet, on the CPU.

        ``full_state``: the UNet's whole state dict as ``Accelerator.get_state_dict`` gathers it (FSDP shards its
        parameters, so the module's own are not whole); None reads the module."""
        if self.mode == "lora":
            return lora_state_dict(self.unet, full_state)
        state = self.unet.state_dict() if full_state is None else full_state
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state_dict` in place (the reference is never touched).

        Raises:
            ValueError: the state does not fit (made with another ``lora`` section, or in the other mode).
        """
        if self.mode == "lora":
            load_lora_state_dict(self.unet, state)
            return
        try:
            self.unet.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"checkpoint does not hold this UNet's full weights ({str(exc).splitlines()[0]}); was it made "
                "with train.mode=lora? Resume with the recipe.yaml saved in the run folder"
            ) from exc


REFERENCE_LORA_FILE = "reference_lora.safetensors"


def starting_lora(cfg) -> Path | None:
    """The recipe's starting LoRA, resolved once for every reader: ``lora.init_from`` (LoRA mode only) as its
    safetensors file (a file, or the adapter file of a folder); None when the run starts from a fresh adapter.

    Raises:
        UnsafeFileError / FileNotFoundError: see :func:`lora_dpo.models.lora_files.resolve_lora_file`.
    """
    if cfg.train.mode != "lora" or not cfg.lora.init_from:
        return None
    return resolve_lora_file(cfg.lora.init_from)


def run_reference_lora(cfg, run_dir: str | Path, fresh: bool, write: bool) -> Path | None:
    """Where a run reads its starting LoRA (``lora.init_from``): its own copy in the run folder.

    A fresh run copies the file to ``<run_dir>/reference_lora.safetensors`` (``write`` on the main process), so the
    reference stays the one the run started with even if the original file is later changed or deleted; a resumed
    run reads that copy. None when the run starts from a fresh adapter.

    Raises:
        UnsafeFileError / FileNotFoundError: see :func:`lora_dpo.models.lora_files.resolve_lora_file`.
    """
    if cfg.train.mode != "lora" or not cfg.lora.init_from:
        return None
    copy = Path(run_dir) / REFERENCE_LORA_FILE
    if fresh or not copy.is_file():
        source = starting_lora(cfg)
        if write:
            shutil.copyfile(source, copy)
        return copy if write or copy.is_file() else source
    try:
        source = starting_lora(cfg)
    except (FileNotFoundError, ValueError):
        return copy
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (source, copy)]
    if digest[0] != digest[1]:
        log.warning("%s changed since the run started; the resumed run keeps its reference %s", source, copy)
    return copy


def build_policy(cfg, unet: torch.nn.Module, device: torch.device | str, family: str = "sd15",
                 init_lora: str | Path | None = None, precomputed_reference: bool = False) -> Policy:
    """Turn a loaded UNet into the policy of ``cfg.train.mode`` (in place), with its reference.

    Args:
        cfg: the :class:`lora_dpo.config.RecipeConfig` (``train.mode``, ``lora``, ``reference``,
            ``train.mixed_precision``, ``train.gradient_checkpointing``, ``loss.type``).
        unet: the base UNet as loaded (full mode needs it in fp32: pass ``unet_dtype=torch.float32`` to
            :func:`lora_dpo.models.loading.load_components`; otherwise the master weights would start from rounded ones).
        device: where the reference runs.
        family: the registry name of the UNet's family (:mod:`lora_dpo.models.families`; reads the keys of a
            starting LoRA).
        init_lora: the LoRA to start from and compare against; default ``cfg.lora.init_from`` (training passes the
            run folder's copy, so a resumed run keeps the reference it started with).
        precomputed_reference: the reference errors come from a latent cache (:mod:`lora_dpo.data.cache`): full mode
            builds no frozen copy (its memory is saved), and the policy's ``reference()`` is never entered.
    Returns:
        A :class:`Policy` whose UNet is in train mode, with gradient checkpointing if asked.
    Raises:
        ValueError: full mode with a UNet not in fp32; LoRA ``target_modules`` that match nothing.
    """
    frozen, autocast, reference_adapter = None, None, None
    unet.train()  # before any frozen copy, which keeps this mode
    init_lora = init_lora or starting_lora(cfg)
    if init_lora:
        params = add_lora_from(unet, init_lora, family)
        reference_adapter = REFERENCE_ADAPTER
        log.info("policy and reference start from the LoRA %s (%s)", init_lora, unet.peft_config[REFERENCE_ADAPTER])
    elif cfg.train.mode == "lora":
        params = add_lora(unet, cfg.lora, family)
    else:
        if next(unet.parameters()).dtype != torch.float32:
            raise ValueError("train.mode=full trains fp32 master weights: load the UNet with unet_dtype=float32")
        if cfg.loss.needs_reference and not precomputed_reference:
            compute_dtype = DTYPES[cfg.train.mixed_precision]
            ref_dtype = torch.float32 if cfg.reference.dtype == "auto" else DTYPES[cfg.reference.dtype]
            frozen = frozen_copy(unet, ref_dtype, "cpu" if cfg.reference.offload else device)
            if ref_dtype not in (compute_dtype, torch.float32):  # an fp32 copy runs under the policy's autocast
                autocast = (torch.device(device).type, ref_dtype)
            if cfg.reference.offload:  # on a CPU-only machine the hooks change nothing but are exercised
                cpu_offload(frozen, execution_device=torch.device(device))
            log.info("reference: frozen copy of the UNet in %s%s", ref_dtype,
                     ", offloaded to CPU memory" if cfg.reference.offload else "")
        unet.requires_grad_(True)
        params = list(unet.parameters())
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return Policy(cfg.train.mode, unet, params, frozen, autocast, reference_adapter)

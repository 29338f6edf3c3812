"""Reading LoRA files safely: safetensors only, and a clear error when an adapter does not fit the model.

Every command that reads an adapter (``generate``, ``merge``, ``export``, ``eval``, ``lora.init_from``) goes
through :func:`resolve_lora_file`, which refuses pickle files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``: unpickling
can run arbitrary code), and through :func:`check_adapter_fits` before the weights touch a UNet, so an SDXL adapter
loaded onto SD1.5 (or the reverse) fails with a message that names the two models, not with a shape error deep
inside PEFT.

Writing: every safetensors file the kit writes goes through :func:`save_safetensors` (or, when a library writes it,
:func:`match_output_mode` after), so it gets the mode of the kit's other outputs (``0o666`` less the umask), not
safetensors' ``0600``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import save_file

from lora_dpo.errors import AdapterMismatchError, CorruptFileError, UnsafeFileError
from lora_dpo.models.families import family_for_index, family_of_pipeline, get_family
from lora_dpo.models.pretrained import corrupt_weights_message, read_model_index, safetensors_problem

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file: what lora-dpo writes and reads first
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Width of the text embeddings the UNet's cross-attention reads: tells the model families apart.
CROSS_ATTENTION_WIDTH = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
# How a LoRA file names its down (A) and up (B) matrices, in the layouts diffusers reads back.
_DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight", ".lora_linear_layer.down.weight")
_UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight", ".lora_up.weight", ".lora_linear_layer.up.weight")


def output_mode() -> int:
    """The permission bits a plain new file of this process gets: ``0o666`` less the umask (``0o644`` under umask
    ``022``, ``0o664`` under ``002``). The umask is read from ``/proc/self/status`` where there is one, else by
    setting it and restoring it at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def match_output_mode(*paths: str | Path) -> None:
    """Give each file of ``paths``, and every file under each folder of ``paths``, the mode of a plain new file
    (:func:`output_mode`), so a team that shares the output folder can read them.

    Needed after every safetensors write: safetensors (0.8) writes each file as a temporary file made with mode
    ``0600`` and renames it into place (atomic), so ``save_file`` and diffusers' / transformers' ``save_pretrained``
    and ``save_lora_weights`` leave ``0600`` files whatever the umask. Paths that do not exist and symbolic links
    are left alone.

    Raises:
        OSError: a file whose mode cannot be changed (not the caller's).
    """
    mode = output_mode()
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and not file.is_symlink():
                os.chmod(file, mode)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (atomic: a temporary file renamed into place), then the mode of a plain new
    file (:func:`match_output_mode`) instead of safetensors' ``0600``. Returns the path written.

    Raises:
        OSError: the folder does not exist or cannot be written (a full disk: ``errno.ENOSPC``).
    """
    save_file(tensors, str(path), metadata=metadata)
    match_output_mode(path)
    return Path(path)


def converted_name(path: Path) -> Path:
    """Where the conversion hint writes a pickle's tensors: ``<stem>.safetensors`` beside it, or
    ``<stem>.converted.safetensors`` when that is the input itself (a pickle named .safetensors) or exists."""
    target = path.with_suffix(".safetensors")
    return path.with_name(f"{path.stem}.converted.safetensors") if target == path or target.exists() else target


def _unsafe_message(path: Path) -> str:
    return (
        f"{path} is not a safetensors file. lora-dpo reads weights only from .safetensors: a pickle file "
        "(torch.save, .bin/.pt/.pth/.ckpt) can run arbitrary code when loaded. If you trust its origin, convert "
        "it once into a new file: python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{path}', weights_only=True), '{converted_name(path)}')\""
    )


def _is_safetensors(path: Path) -> bool:
    """The file starts with a safetensors header: an 8-byte little-endian length, then a JSON object."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            if len(head) < 9:
                return False
            (length,) = struct.unpack("<Q", head[:8])
            return head[8:9] == b"{" and 2 <= length <= path.stat().st_size - 8
    except OSError:
        return False


def resolve_lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA adapter given as a file or a folder.

    A folder is searched for ``pytorch_lora_weights.safetensors`` (diffusers, a lora-dpo run folder), then
    ``adapter_model.safetensors`` (PEFT), then a single ``*.safetensors`` file (kohya / ComfyUI / A1111).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without a safetensors file.
        UnsafeFileError: a pickle file (by suffix or content), or a folder holding only pickle weights.
        ValueError: a folder with several candidate files (the message lists them; pass one).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"LoRA adapter {path} not found: pass a run folder or a .safetensors file")
    if path.is_dir():
        for name in (WEIGHT_NAME, PEFT_WEIGHT_NAME):
            if (path / name).is_file():
                return resolve_lora_file(path / name)
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return resolve_lora_file(found[0])
        if len(found) > 1:
            raise ValueError(f"{path} holds several .safetensors files ({', '.join(p.name for p in found)}): pass one")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFileError(_unsafe_message(path / pickles[0]))
        raise FileNotFoundError(f"{path} holds no .safetensors LoRA file (expected {WEIGHT_NAME})")
    if path.suffix in PICKLE_SUFFIXES or not _is_safetensors(path):
        raise UnsafeFileError(_unsafe_message(path))
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a LoRA file (on the CPU) and its safetensors header metadata (``{}`` if none).

    Raises: see :func:`resolve_lora_file`; CorruptFileError: a truncated or corrupt file (the header does not fit).
    """
    file = resolve_lora_file(path)
    problem = safetensors_problem(file)
    if problem:
        raise CorruptFileError(corrupt_weights_message(file, problem))
    with safe_open(str(file), framework="pt", device="cpu") as fh:
        metadata = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return tensors, metadata


def lora_metadata(metadata: dict[str, str], prefix: str = "unet") -> dict | None:
    """The UNet adapter's PEFT ``LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``,
    ...) from the header key ``lora_adapter_metadata`` that diffusers' ``save_lora_weights`` writes (there as
    ``unet.r``, ...; the prefix is removed here). None when the file carries no such metadata (kohya files)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    fields = {k.removeprefix(f"{prefix}."): v for k, v in json.loads(raw).items() if k.startswith(f"{prefix}.")}
    return fields or None


def unet_lora_shapes(path: str | Path, family: str, unet_config) -> dict[str, tuple[tuple, tuple]]:
    """``{UNet module path: (down/A shape, up/B shape)}`` of an adapter file, in diffusers module names.

    Kohya / A1111 / ComfyUI key layouts (SD1.5 diffusers-style and SDXL ``input_blocks`` names) are converted by
    diffusers' own reader (``lora_state_dict``), the one ``pipe.load_lora_weights`` uses. Text-encoder keys are left
    out. ``family``: a registry name (:mod:`lora_dpo.models.families`). Raises: see :func:`resolve_lora_file`.
    """
    state, _ = read_lora_file(path)
    converted = get_family(family).lora_state_dict(state, unet_config)[0]
    unet = {k.removeprefix("unet.").removeprefix("base_model.model."): v for k, v in converted.items()
            if not k.startswith("text_encoder")}
    shapes: dict[str, list] = {}
    for name, tensor in convert_unet_state_dict_to_peft(unet).items():  # as diffusers' load_lora_adapter does
        for i, suffixes in enumerate((_DOWN_SUFFIXES, _UP_SUFFIXES)):
            for suffix in suffixes:
                if name.endswith(suffix):
                    shapes.setdefault(name[: -len(suffix)], [None, None])[i] = tuple(tensor.shape)
    return {k: (v[0], v[1]) for k, v in shapes.items()}


def _width_name(width: int) -> str:
    return f"{CROSS_ATTENTION_WIDTH[width]} ({width})" if width in CROSS_ATTENTION_WIDTH else str(width)


def check_adapter_fits(path: str | Path, unet: torch.nn.Module, family: str) -> int:
    """Check that every UNet module an adapter targets exists in ``unet`` with the adapter's input/output sizes.

    Args:
        path: the adapter (file or folder, any layout ``pipe.load_lora_weights`` reads).
        unet: the diffusers ``UNet2DConditionModel`` it is about to go into.
        family: the registry name of the model's family (:mod:`lora_dpo.models.families`), whose pipeline reader
            converts the keys.
    Returns:
        The number of UNet modules the adapter targets.
    Raises:
        AdapterMismatchError: a module is missing, or its sizes differ. When the cross-attention width differs the
            message names both families (e.g. an SDXL adapter, width 2048, on an SD1.5 UNet, width 768).
        UnsafeFileError, FileNotFoundError: see :func:`resolve_lora_file`.
    """
    file = resolve_lora_file(path)
    shapes = unet_lora_shapes(file, family, unet.config)
    if not shapes:
        raise AdapterMismatchError(f"{file} holds no UNet LoRA weights this kit can read")
    modules = dict(unet.named_modules())
    model_width = int(unet.config.cross_attention_dim)
    missing, wrong = [], []
    for name, (down, up) in sorted(shapes.items()):
        module = modules.get(name)
        if module is None:
            missing.append(name)
            continue
        base = getattr(module, "base_layer", module)
        fan_in = getattr(base, "in_features", getattr(base, "in_channels", None))
        fan_out = getattr(base, "out_features", getattr(base, "out_channels", None))
        if (down is not None and down[1] != fan_in) or (up is not None and up[0] != fan_out):
            wrong.append((name, down, up, fan_in, fan_out))
    if not missing and not wrong:
        return len(shapes)
    what = f"the adapter {file} does not fit this {family} UNet (cross-attention width {_width_name(model_width)})"
    for name, down, *_ in wrong:
        if name.endswith(("attn2.to_k", "attn2.to_v")) and down is not None:
            raise AdapterMismatchError(
                f"{what}: it was trained for a model with cross-attention width {_width_name(down[1])}. Load it onto "
                "the base model it was trained for."
            )
    detail = []
    if missing:
        detail.append(f"{len(missing)} of its {len(shapes)} modules are not in this UNet (e.g. {missing[0]})")
    if wrong:
        name, down, up, fan_in, fan_out = wrong[0]
        detail.append(f"{len(wrong)} modules have other sizes (e.g. {name}: adapter {down[1] if down else '?'} -> "
                      f"{up[0] if up else '?'}, UNet {fan_in} -> {fan_out})")
    raise AdapterMismatchError(f"{what}: {'; '.join(detail)}. Load it onto the base model it was trained for.")


def load_adapter(pipe, path: str | Path, adapter_name: str) -> Path:
    """Load a LoRA file into a diffusers pipeline under ``adapter_name``, safetensors only, after the fit check.

    Returns the file read. Raises: see :func:`check_adapter_fits`.
    """
    family = family_of_pipeline(pipe).name
    file = resolve_lora_file(path)
    check_adapter_fits(file, pipe.unet, family)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name, use_safetensors=True)
    return file


def check_adapter_fits_model(path: str | Path, model: str, revision: str | None = None) -> Path:
    """:func:`check_adapter_fits` against a pipeline folder or hub id, before any weights load.

    The UNet is built from its ``unet/config.json`` on the meta device (no memory, no weights), so a mismatched or
    unsafe adapter fails in a second. Returns the adapter's safetensors file. Raises: see :func:`check_adapter_fits`
    and :func:`lora_dpo.models.pretrained.read_model_index`.
    """
    family = family_for_index(read_model_index(str(model), revision)).name
    file = resolve_lora_file(path)
    config = UNet2DConditionModel.load_config(str(model), subfolder="unet", revision=revision)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    check_adapter_fits(file, unet, family)
    return file

"""Reading LoRA files safely: safetensors only, and a clear error when an adapter does not fit the model.

Every command that reads an adapter (``generate``, ``merge``, ``export``, ``eval``, ``lora.init_from``) goes
through :func:`resolve_lora_file`, which refuses pickle files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``: unpickling
can run arbitrary code), and through :func:`check_adapter_fits` before the weights touch the denoiser (a UNet, or
the SD3 / FLUX transformer: the family's ``denoiser_name``), so an adapter of another family fails with a message
that names the two families (from the file's keys, :func:`adapter_key_families`, and the ``lora_dpo.family`` header
key the kit writes, :func:`header_family`), and an SDXL adapter loaded onto SD1.5 (or the reverse) names the two
cross-attention widths, not with a shape error deep inside PEFT. :func:`check_adapter_fits_model` does it against a
pipeline folder before any weights load (the denoiser built on the meta device from its config).

Writing: every safetensors file the kit writes goes through :func:`save_safetensors` (or, when a library writes it,
:func:`match_output_mode` after), so it gets the mode of the kit's other outputs (``0o666`` less the umask), not
safetensors' ``0600``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import save_file

from lora_dpo.errors import AdapterMismatchError, CorruptFileError, UnsafeFileError
from lora_dpo.models.families import FAMILIES, ModelFamily, family_for_index, family_of_pipeline, get_family
from lora_dpo.models.pretrained import corrupt_weights_message, read_model_index, safetensors_problem

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file: what lora-dpo writes and reads first
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
FAMILY_KEY = "lora_dpo.family"  # safetensors header key: the registry name of the family a kit-written file is for
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


def lora_metadata(metadata: dict[str, str], prefix: str | None = "unet") -> dict | None:
    """The denoiser adapter's PEFT ``LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``,
    ``rank_pattern``, ...) from the header key ``lora_adapter_metadata`` that diffusers' ``save_lora_weights`` writes
    (there as ``unet.r`` / ``transformer.r``, ...; the prefix is removed here).

    ``prefix``: the denoiser's key prefix (a family's ``denoiser_name``); None takes the first of ``unet`` and
    ``transformer`` that the header has. Returns None when the file carries no such metadata (kohya files).
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    fields = json.loads(raw)
    for name in ((prefix,) if prefix else DENOISER_PREFIXES):
        found = {k.removeprefix(f"{name}."): v for k, v in fields.items() if k.startswith(f"{name}.")}
        if found:
            return found
    return None


# -- which family an adapter was made for ---------------------------------------------------------------------------

DENOISER_PREFIXES = ("unet", "transformer")  # the denoiser_name of the registered families, as LoRA key prefixes
# Prefixes other tools put before a module path (PEFT, ComfyUI / BFL, kohya); stripped before the structure is read.
_OUTER_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
# Module names only a UNet has (diffusers' and Stability's SGM names, dotted or kohya's underscores).
_UNET_BLOCKS = re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]")
# Markers of one transformer family in the keys: registry name -> [(pattern, what the message says)].
_LORA_PART = re.compile(r"\.(lora_[AB]|lora\.(down|up)|lora_(down|up)|lora_linear_layer\.(down|up))(\.[^.]+)?\.weight$"
                        r"|\.alpha$")


def _module_paths(keys) -> set[str]:
    """The module paths of LoRA keys, without the LoRA part and the outer prefixes (the denoiser prefix stays)."""
    paths = set()
    for key in keys:
        path = _LORA_PART.sub("", key)
        for prefix in _OUTER_PREFIXES:
            path = path.removeprefix(prefix)
        paths.add(path)
    return paths


def adapter_key_families(keys) -> tuple[list[ModelFamily], str]:
    """The families whose denoiser an adapter's keys can belong to, from their structure alone, and why.

    UNet keys (prefix ``unet.``, or ``down_blocks`` / ``input_blocks`` / ... in any layout, kohya's included) give
    every UNet family (SD1.x/2.x, SDXL: the shape check tells them apart); transformer keys (prefix ``transformer.``,
    root ``transformer_blocks``) every transformer family, narrowed to FLUX.1 by ``single_transformer_blocks`` or
    kohya's ``lora_unet_double_blocks_`` / ``single_blocks_`` (BFL names), and to SD3/SD3.5 by ``joint_blocks``,
    SD3.5's ``attn2`` or SD3's ``context_pre_only`` last block (each family's
    :meth:`~lora_dpo.models.families.base.ModelFamily.adapter_signature`). Text-encoder keys are
    ignored. Returns ``([], "")`` when the keys say nothing (e.g. a text-encoder-only file, an unknown layout).

    Args:
        keys: the file's tensor names.
    Returns:
        ``(families, evidence)``: the candidates (registry order) and a phrase for messages ("its keys start with
        ``unet.``").
    """
    keys = [k for k in keys if not k.startswith(("text_encoder", "lora_te"))]
    if not keys:
        return [], ""
    families = list(FAMILIES.values())
    paths = _module_paths(keys)
    for family in families:  # the keys only one family's adapters have (ModelFamily.lora_key_markers)
        why = family.adapter_signature(paths)
        if why:
            return [family], why
    unet = [f for f in families if f.denoiser_name == "unet"]
    if any(p.startswith("unet.") for p in paths):
        return unet, "its keys start with unet."
    if any(_UNET_BLOCKS.search(p) for p in paths):
        return unet, "its keys name UNet blocks (down_blocks / input_blocks ...)"
    if any(p.startswith("lora_unet_") for p in paths):
        return unet, "its keys are kohya UNet names (lora_unet_)"
    transformer = [f for f in families if f.denoiser_name == "transformer"]
    if any(p.startswith("transformer.") or p.startswith("transformer_blocks.") for p in paths):
        return transformer, "its keys start with transformer."
    return [], ""


def header_family(metadata: dict[str, str]) -> ModelFamily | None:
    """The family a lora-dpo file declares in its safetensors header (:data:`FAMILY_KEY`, written by
    :func:`lora_dpo.export.artifacts.save_lora_adapter` and ``lora-dpo export``); None when absent or not a
    registered name (files of other tools, of earlier versions)."""
    name = metadata.get(FAMILY_KEY)
    return FAMILIES.get(name) if name else None


def _labels(families) -> str:
    return " or ".join(f"{f.label} ({f.name})" for f in families)


def family_mismatch(file, families, evidence: str, model: ModelFamily, detail: str | None = None) -> str:
    """The message of an adapter made for ``families`` (``evidence``: how that is known) on a ``model`` of another
    family: it names both, e.g. "... was trained for SD3/SD3.5 (sd3) (its keys: ...) but the model is FLUX.1 (flux)",
    then ``detail`` (what the shape check found), then what to do."""
    more = f"; it {detail}" if detail else ""
    return (f"the adapter {file} was trained for {_labels(families)} ({evidence}) but the model is {_labels([model])}"
            f"{more}: load it onto the base model it was trained for")


def _declared_message(file, declared: ModelFamily, model: ModelFamily, detail: str | None = None) -> str:
    return family_mismatch(file, [declared], f"its header says {FAMILY_KEY}={declared.name}", model, detail)


def check_adapter_family(file, tensors: dict, header: dict, family: str) -> ModelFamily | None:
    """Check, from the keys and the header alone (no reader, no model), that an adapter was made for ``family``.

    Raises :class:`AdapterMismatchError` (:func:`family_mismatch`) at once when the keys belong to another family
    (:func:`adapter_key_families`), or when the header declares another family (:func:`header_family`) and the two
    families' denoisers differ in kind (UNet / transformer) or are transformers. Between two UNet families that
    family is returned instead, for the caller to name with the shape check's detail (the two cross-attention
    widths); None when nothing contradicts ``family``.
    """
    model = get_family(family)
    claimed, evidence = adapter_key_families(tensors)
    if claimed and model not in claimed:
        raise AdapterMismatchError(family_mismatch(file, claimed, evidence, model))
    declared = header_family(header)
    if declared is None or declared is model:
        return None
    if declared.denoiser_name == model.denoiser_name == "unet":
        return declared
    raise AdapterMismatchError(_declared_message(file, declared, model))


# -- does an adapter fit a denoiser --------------------------------------------------------------------------------

def denoiser_config(model: str | Path, family: str | ModelFamily, revision: str | None = None) -> dict:
    """The denoiser's config of a pipeline folder or hub id (``<denoiser_name>/config.json``: ``unet`` or
    ``transformer``), as a dict. Raises: what ``ConfigMixin.load_config`` raises (OSError / EnvironmentError: no
    such file)."""
    spec = get_family(family) if isinstance(family, str) else family
    return dict(spec.denoiser_class.load_config(str(model), subfolder=spec.denoiser_name, revision=revision))


def denoiser_of(pipe) -> torch.nn.Module:
    """A loaded pipeline's denoiser: ``pipe.unet`` or ``pipe.transformer`` (its family's ``denoiser_name``)."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser_name)


def _lora_shapes(state: dict[str, torch.Tensor], family: str, denoiser_config) -> dict[str, tuple[tuple, tuple]]:
    spec = get_family(family)
    converted = spec.lora_state_dict(dict(state), denoiser_config)[0]
    prefix = f"{spec.denoiser_name}."
    own = {}
    for key, tensor in converted.items():
        if key.startswith("text_encoder"):
            continue
        own[key.removeprefix(prefix).removeprefix("base_model.model.")] = tensor
    shapes: dict[str, list] = {}
    for name, tensor in convert_unet_state_dict_to_peft(own).items():  # as diffusers' load_lora_adapter does
        for i, suffixes in enumerate((_DOWN_SUFFIXES, _UP_SUFFIXES)):
            for suffix in suffixes:
                if name.endswith(suffix):
                    shapes.setdefault(name[: -len(suffix)], [None, None])[i] = tuple(tensor.shape)
    return {k: (v[0], v[1]) for k, v in shapes.items()}


def denoiser_lora_shapes(path: str | Path, family: str, denoiser_config) -> dict[str, tuple[tuple, tuple]]:
    """``{denoiser module path: (down/A shape, up/B shape)}`` of an adapter file, in diffusers module names.

    Kohya / A1111 / ComfyUI key layouts (SD1.5 diffusers-style, SDXL ``input_blocks`` names, FLUX's BFL names with
    q, k, v fused) are converted by diffusers' own reader (the family's ``lora_state_dict``, the one
    ``pipe.load_lora_weights`` uses). Text-encoder keys are left out. ``family``: a registry name
    (:mod:`lora_dpo.models.families`); ``denoiser_config``: the denoiser's config (SDXL kohya names need it).

    Raises: see :func:`read_lora_file`; what the reader raises on keys it cannot convert (ValueError; FLUX's reader:
    AssertionError for a kohya ``linear1`` whose width is not FLUX.1's).
    """
    state, _ = read_lora_file(path)
    return _lora_shapes(state, family, denoiser_config)


unet_lora_shapes = denoiser_lora_shapes  # the name of earlier versions


def _width_name(width: int) -> str:
    return f"{CROSS_ATTENTION_WIDTH[width]} ({width})" if width in CROSS_ATTENTION_WIDTH else str(width)


def _model_width(denoiser: torch.nn.Module) -> tuple[str, int | None]:
    """``(what, width)`` that tells models of one kind apart: a UNet's cross-attention width, a transformer's
    attention width (heads x head size)."""
    config = denoiser.config
    if config.get("cross_attention_dim") is not None:
        return "cross-attention width", int(config["cross_attention_dim"])
    heads, size = config.get("num_attention_heads"), config.get("attention_head_dim")
    return "attention width", (int(heads) * int(size) if heads and size else None)


def _shape_problem(shapes: dict, denoiser: torch.nn.Module, spec: ModelFamily) -> str | None:
    """What does not fit (missing modules, other sizes): "does not fit this <family> <denoiser> (...): ...", to follow
    the adapter's name; None if all fits."""
    modules = dict(denoiser.named_modules())
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
        return None
    what, width = _model_width(denoiser)
    shown = _width_name(width) if what.startswith("cross") and width else str(width)
    kind = "UNet" if spec.denoiser_name == "unet" else spec.denoiser_name
    head = f"does not fit this {spec.name} {kind} ({what} {shown})"
    for name, down, *_ in wrong:
        if name.endswith(("attn2.to_k", "attn2.to_v")) and down is not None and what.startswith("cross"):
            return f"{head}: it was trained for a model with cross-attention width {_width_name(down[1])}"
    detail = []
    if missing:
        detail.append(f"{len(missing)} of its {len(shapes)} modules are not in this {kind} (e.g. {missing[0]})")
    if wrong:
        name, down, up, fan_in, fan_out = wrong[0]
        detail.append(f"{len(wrong)} modules have other sizes (e.g. {name}: adapter {down[1] if down else '?'} -> "
                      f"{up[0] if up else '?'}, {kind} {fan_in} -> {fan_out})")
    return f"{head}: {'; '.join(detail)}"


# What a reader's bare ``assert`` means (diffusers 0.3x): its kohya FLUX conversion splits a single block's fused
# ``linear1`` at FLUX.1's widths.
_READER_ASSUMPTIONS = ("a layout assumption of the reader failed; e.g. diffusers splits a kohya FLUX "
                       "single_blocks_<i>_linear1 at FLUX.1's widths (3 x 3072 + 12288) only")


def check_adapter_fits(path: str | Path, unet: torch.nn.Module, family: str) -> int:
    """Check that an adapter was made for ``family`` and that every denoiser module it targets exists in ``unet``
    with the adapter's input/output sizes.

    First, from the file's keys and header alone, before diffusers' reader converts anything
    (:func:`check_adapter_family`): an adapter of another family fails with a message naming both (an SD3 adapter on
    FLUX.1: "the adapter ... was trained for SD3/SD3.5 (sd3) (its header says lora_dpo.family=sd3) but the model is
    FLUX.1 (flux)"). Then the family's reader converts the keys (kohya layouts too) and the shapes are compared.

    Args:
        path: the adapter (file or folder, any layout ``pipe.load_lora_weights`` reads).
        unet: the denoiser it is about to go into: ``UNet2DConditionModel`` (SD1.x/2.x, SDXL),
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel`` (real weights, meta device, or already holding
            adapters).
        family: the registry name of the model's family (:mod:`lora_dpo.models.families`), whose pipeline reader
            converts the keys.
    Returns:
        The number of denoiser modules the adapter targets.
    Raises:
        AdapterMismatchError: the adapter was made for another family; its keys cannot be read by the family's
            reader; a module is missing or its sizes differ. Between the UNet families the message names the two
            cross-attention widths (e.g. an SDXL adapter, width 2048, on an SD1.5 UNet, width 768).
        UnsafeFileError, FileNotFoundError, CorruptFileError: see :func:`read_lora_file`.
    """
    file = resolve_lora_file(path)
    spec = get_family(family)
    tensors, header = read_lora_file(file)
    declared = check_adapter_family(file, tensors, header, family)
    try:
        shapes = _lora_shapes(tensors, family, unet.config)
    except (ValueError, KeyError, AssertionError) as exc:
        if declared:
            raise AdapterMismatchError(_declared_message(file, declared, spec)) from exc
        why = str(exc) or _READER_ASSUMPTIONS
        raise AdapterMismatchError(f"the adapter {file} cannot be read as a {spec.label} LoRA by diffusers' "
                                   f"{spec.pipeline_class.__name__} reader ({type(exc).__name__}: {why})") from exc
    if not shapes:
        raise AdapterMismatchError(f"{file} holds no {spec.label} {spec.denoiser_name} LoRA weights this kit can read")
    problem = _shape_problem(shapes, unet, spec)
    if declared:
        raise AdapterMismatchError(_declared_message(file, declared, spec, problem))
    if problem:
        raise AdapterMismatchError(f"the adapter {file} {problem}. Load it onto the base model it was trained for.")
    return len(shapes)


def load_adapter(pipe, path: str | Path, adapter_name: str) -> Path:
    """Load a LoRA file into a diffusers pipeline under ``adapter_name``, safetensors only, after the fit check on
    the pipeline's denoiser (``pipe.unet`` / ``pipe.transformer``).

    Returns the file read. Raises: see :func:`check_adapter_fits`.
    """
    family = family_of_pipeline(pipe)
    file = resolve_lora_file(path)
    check_adapter_fits(file, getattr(pipe, family.denoiser_name), family.name)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name, use_safetensors=True)
    return file


def meta_denoiser(model: str | Path, revision: str | None = None) -> tuple[torch.nn.Module, ModelFamily]:
    """The denoiser of a pipeline folder or hub id built from its config on the meta device (no memory, no weights),
    with the pipeline's family: ``UNet2DConditionModel`` from ``unet/config.json``, SD3 / FLUX transformers from
    ``transformer/config.json``. Raises: see :func:`lora_dpo.models.pretrained.read_model_index`; OSError: no
    denoiser config."""
    spec = family_for_index(read_model_index(str(model), revision))
    config = denoiser_config(model, spec, revision)
    with torch.device("meta"):
        denoiser = spec.denoiser_class.from_config(config)
    return denoiser, spec


def check_adapter_fits_model(path: str | Path, model: str, revision: str | None = None) -> Path:
    """:func:`check_adapter_fits` against a pipeline folder or hub id, before any weights load.

    The denoiser is built from its config on the meta device (:func:`meta_denoiser`), so a mismatched or unsafe
    adapter fails in a second. Returns the adapter's safetensors file. Raises: see :func:`check_adapter_fits`
    and :func:`lora_dpo.models.pretrained.read_model_index`.
    """
    file = resolve_lora_file(path)
    denoiser, spec = meta_denoiser(model, revision)
    check_adapter_fits(file, denoiser, spec.name)
    return file

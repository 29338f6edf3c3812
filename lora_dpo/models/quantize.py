"""A frozen base in 4 or 8 bits (``model.quantization: nf4 | int8``): the denoiser's linear layers become
bitsandbytes layers, in place, and LoRA trains in fp32 on top (QLoRA: Dettmers et al. 2023, arXiv 2305.14314: NF4
weights in blocks of 64 with double-quantized block scales; int8: LLM.int8(), Dettmers et al. 2022, arXiv
2208.07339).

The layers are swapped after the weights load and quantized by bitsandbytes when the module moves to its device
(``Params4bit`` / ``Int8Params`` quantize on ``.to(device)``; on a GPU they arrive quantized, so the device never
holds the full-precision transformer). diffusers' own route (``BitsAndBytesConfig`` in ``from_pretrained``) is the
same layers, but its quantizer refuses to run without a GPU ("No GPU found"), which would leave the CPU tests unable
to exercise the quantized path at all; this one runs wherever bitsandbytes does (0.50: CPU and CUDA).

Only the linear layers inside the transformer blocks are quantized, where nearly all weights are; the embedders and
the output projection stay in the weight dtype, as diffusers keeps its ``modules_to_not_convert``.

Three details make the layers behave as diffusers' quantizer leaves them (on a GPU), for PEFT and for training:

- the model is flagged ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` (what diffusers' ``BnB4BitDiffusersQuantizer``
  sets): PEFT reads these flags to wrap the layers with its bitsandbytes LoRA layers
  (``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``, which can merge into and unmerge from quantized weights);
  without them it wraps them as plain ``lora.Linear``, whose merge would write into the packed 4-bit bytes.
- bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place, on CPUs with AVX512-BF16, the first time it runs in
  eval mode on an input without grad (``_convert_weight_packed_for_cpu``): the block scales become bf16 (so the same
  layer computes differently, by ~1e-3 relative, before and after; e.g. the DPO reference pass under ``no_grad``
  would repack the weights the policy pass had used), the result depends on the CPU, and it fails outright for a
  layer narrower than a block (``in_features < 64``, the tiny test models). The repacking is turned off per layer.
- NF4 blocks never straddle two rows of a weight (:func:`nf4_block_size`): 64 values, QLoRA's block, where
  ``in_features`` is a multiple of 64 (every linear layer of SD3 / SD3.5 / FLUX.1), else 32. bitsandbytes 0.50.2's
  ``quantize_4bit`` blocks the flattened weight, but its native CPU ``dequantize_4bit`` (which its CPU matmul also
  uses) reads the block scales row by row, so where a row is not a whole number of blocks the CPU decodes values with
  another block's scale (measured on 192 x 32, 128 x 32 and 64 x 32
  weights: errors 2.4 to 3.1 times NF4's largest rounding error).
  A layer whose ``in_features`` is not a multiple of 32 stays in the weight dtype (none in the real models).
"""

from __future__ import annotations

import logging

import torch

from lora_dpo.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "int8")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
_FLAGS = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}
NF4_BLOCK = 64
"""Values per NF4 block scale (QLoRA's), used wherever a weight's rows are whole blocks of it."""


def nf4_block_size(in_features: int) -> int | None:
    """The NF4 block size of a weight with rows of ``in_features`` values: :data:`NF4_BLOCK` (64) when the rows are
    whole blocks of it, else 32 when they are of that, else None (the layer is not quantized; module docstring)."""
    for size in (NF4_BLOCK, 32):
        if in_features % size == 0:
            return size
    return None


def bitsandbytes_problem() -> str | None:
    """Why a quantized base cannot run here (no bitsandbytes, or one without its native library), or None."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); pip install bitsandbytes"
    if not hasattr(bnb.nn, "Linear4bit"):
        return "this bitsandbytes has no 4-bit layers; pip install -U bitsandbytes"
    return None


def check_quantization(kind: str) -> None:
    """Refuse ``model.quantization=kind`` before any weights load when it cannot run here (for
    :meth:`lora_dpo.models.families.rectified_flow.RectifiedFlowFamily.check_recipe`).

    Raises:
        ConfigError: an unknown ``kind``; bitsandbytes missing or unusable (:func:`bitsandbytes_problem`), naming
            the option and the fix; a machine whose accelerator is Apple MPS (bitsandbytes has no MPS layers).
    """
    if kind not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization must be one of {QUANTIZATIONS}, not {kind!r}")
    problem = bitsandbytes_problem()
    if problem:
        raise ConfigError(f"model.quantization={kind} needs bitsandbytes: {problem} (or remove model.quantization)")
    if not torch.cuda.is_available() and torch.backends.mps.is_available():  # where accelerate would train
        raise ConfigError(f"model.quantization={kind}: bitsandbytes' 4/8-bit layers run on CUDA and on the CPU, not on "
                          "Apple MPS, where this run would train; remove model.quantization (or train on a CUDA GPU)")


def _quantized_linear(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight (not yet quantized: that happens on ``.to(device)``) and its
    bias (kept in its dtype)."""
    import bitsandbytes as bnb

    weight = linear.weight.data
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         blocksize=nf4_block_size(linear.in_features))
        layer.support_avx512bf16_for_cpu = False  # no in-place repacking in eval mode (module docstring)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_linear_layers(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace every ``nn.Linear`` inside ``model``'s transformer blocks by a bitsandbytes layer, in place:
    ``nf4`` (``Linear4bit``, NF4, blocks of 64 (:func:`nf4_block_size`) with 8-bit block scales, computed in
    ``compute_dtype``: pass the transformer's weight dtype) or ``int8`` (``Linear8bitLt``, LLM.int8(), outlier
    threshold 6, one fp32 scale per output row). NF4 leaves a layer whose ``in_features`` is not a multiple of 32 in
    the weight dtype, with a warning. The weights are quantized when the layers move (``.to(device)``, done here on
    the weights' current device); ``model`` is flagged ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` for PEFT
    (module docstring).

    Args:
        model: ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` (anything with ``transformer_blocks`` and/or
            ``single_transformer_blocks`` holding ``nn.Linear`` layers), weights of any float dtype.
    Returns:
        The number of layers replaced.
    Raises:
        ValueError: an unknown ``kind``, or a model without linear layers in transformer blocks.
        ImportError: bitsandbytes missing (:func:`bitsandbytes_problem`).
    """
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {kind!r}")
    problem = bitsandbytes_problem()
    if problem:
        raise ImportError(problem)
    device = next(model.parameters()).device
    count = skipped = 0
    for blocks_name in BLOCK_LISTS:
        blocks = getattr(model, blocks_name, None)
        if blocks is None:
            continue
        for block in blocks:
            for name, module in list(block.named_modules()):
                if type(module) is not torch.nn.Linear:
                    continue
                if kind == "nf4" and nf4_block_size(module.in_features) is None:
                    skipped += 1
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, _quantized_linear(module, kind, compute_dtype).to(device))
                count += 1
    if not count:
        raise ValueError(f"{type(model).__name__} has no linear layers in {' / '.join(BLOCK_LISTS)} to quantize")
    if skipped:
        log.warning("%d linear layers of %s kept in %s: their in_features is not a multiple of 32, which NF4 blocks "
                    "need on the CPU", skipped, type(model).__name__, next(model.parameters()).dtype)
    setattr(model, _FLAGS[kind], True)
    return count


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _statistics_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the per-weight statistics a quantized weight carries beside its packed values: NF4's block scales
    (``absmax``: uint8 when double-quantized, with the fp32 scales of those, ``state2.absmax``, and their fp32
    ``offset``), int8's row scales (``SCB``, fp32, one per output row). The constant code tables (NF4's 16 values,
    the 256-entry dynamic map of the scales) belong to the format, not to the weight, and are not counted."""
    state = getattr(tensor, "quant_state", None)
    if state is None:
        return _nbytes(getattr(tensor, "SCB", None))
    size = _nbytes(state.absmax)
    if getattr(state, "nested", False):
        size += _nbytes(state.state2.absmax) + _nbytes(state.offset)
    return size


def quantized_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s parameters and buffers: ``{"quantized": ..., "other": ...}``.

    ``quantized``: the 4/8-bit weights (uint8 / int8 storage; an NF4 weight of ``n`` values is ``ceil(n/2)`` bytes)
    with their statistics (:func:`_statistics_bytes`); ``other``: everything else (biases, norms, embedders, LoRA),
    in its own dtype. A module shared by two parents is counted once.
    """
    quantized = other = 0
    seen: set[int] = set()
    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if tensor.dtype in (torch.uint8, torch.int8):
                quantized += _nbytes(tensor) + _statistics_bytes(tensor)
            else:
                other += _nbytes(tensor)
    return {"quantized": quantized, "other": other}

"""A frozen base in 4 or 8 bits (``model.quantization: nf4 | int8``): the denoiser's linear layers become
bitsandbytes layers, in place, and LoRA trains in fp32 on top (QLoRA: Dettmers et al. 2023, arXiv 2305.14314).

The layers are swapped after the weights load and quantized by bitsandbytes when the module moves to its device
(``Params4bit`` / ``Int8Params`` quantize on ``.to(device)``; on a GPU they arrive quantized, so the device never
holds the full-precision transformer). diffusers' own route (``BitsAndBytesConfig`` in ``from_pretrained``) is the
same layers, but its quantizer refuses to run without a GPU ("No GPU found"), which would leave the CPU tests unable
to exercise the quantized path at all; this one runs wherever bitsandbytes does (0.50: CPU and CUDA).

Only the linear layers inside the transformer blocks are quantized, where nearly all weights are; the embedders and
the output projection stay in the weight dtype, as diffusers keeps its ``modules_to_not_convert``.
"""

from __future__ import annotations

import torch

QUANTIZATIONS = ("nf4", "int8")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def bitsandbytes_problem() -> str | None:
    """Why a quantized base cannot run here (no bitsandbytes, or one without its native library), or None."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); pip install bitsandbytes"
    if not hasattr(bnb.nn, "Linear4bit"):
        return "this bitsandbytes has no 4-bit layers; pip install -U bitsandbytes"
    return None


def _quantized_linear(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.data
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_linear_layers(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace every ``nn.Linear`` inside ``model``'s transformer blocks by a bitsandbytes layer, in place:
    ``nf4`` (``Linear4bit``, NF4, blocks of 64, computed in ``compute_dtype``) or ``int8`` (``Linear8bitLt``,
    LLM.int8(), outlier threshold 6). The weights are quantized when the model next moves (``.to(device)``, done
    here on the weights' current device). Returns the number of layers replaced.

    Raises:
        ValueError: an unknown ``kind``, or a model without transformer blocks.
        ImportError: bitsandbytes missing (:func:`bitsandbytes_problem`).
    """
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {kind!r}")
    problem = bitsandbytes_problem()
    if problem:
        raise ImportError(problem)
    device = next(model.parameters()).device
    count = 0
    for blocks_name in BLOCK_LISTS:
        blocks = getattr(model, blocks_name, None)
        if blocks is None:
            continue
        for block in blocks:
            for name, module in list(block.named_modules()):
                if type(module) is not torch.nn.Linear:
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, _quantized_linear(module, kind, compute_dtype).to(device))
                count += 1
    if not count:
        raise ValueError(f"{type(model).__name__} has no linear layers in {' / '.join(BLOCK_LISTS)} to quantize")
    return count


def quantized_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s parameters and buffers: ``{"quantized": ..., "other": ...}`` (the 4/8-bit weights with
    their quantization statistics, and everything else)."""
    quantized = other = 0
    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            size = tensor.numel() * tensor.element_size()
            if tensor.dtype in (torch.uint8, torch.int8):
                quantized += size
                state = getattr(tensor, "quant_state", None)
                if state is not None and getattr(state, "absmax", None) is not None:
                    quantized += state.absmax.numel() * state.absmax.element_size()
            else:
                other += size
    return {"quantized": quantized, "other": other}

"""A 4-bit / 8-bit frozen base under LoRA (``model.quantization: nf4 | int8``; QLoRA: Dettmers et al. 2023, arXiv
2305.14314) on the tiny SD3 and FLUX pipelines, on the CPU: the step-0 loss, learning, exact resume, the exported
adapter on the full-precision base, the real size of the quantized layers, and the refusals.

The quantized layers are bitsandbytes' (:mod:`lora_dpo.models.quantize`); bitsandbytes 0.50 runs them on the CPU.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from diffusers import ModelMixin
from peft.tuners.lora import bnb as lora_bnb
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.models import quantize
from lora_dpo.models.adapters import adapters_disabled, add_lora, lora_state_dict
from lora_dpo.models.families import get_family, pipeline_class, rectified_flow
from lora_dpo.models.loading import load_components

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sd3": ROOT / "recipes/sd35/lora_dpo.yaml", "flux": ROOT / "recipes/flux/lora_dpo.yaml"}
EPS32 = torch.finfo(torch.float32).eps
LN2 = math.log(2)
CKPT = "checkpoints/step_{}/trainable_weights.safetensors"
LORA_LAYER = {"nf4": lora_bnb.Linear4bit, "int8": lora_bnb.Linear8bitLt}
BNB_LAYER = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def _args(model, data, out, *extra):
    return [
        f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=32",
        f"output.dir={out}", "train.batch_size=2", "train.max_steps=3", "train.checkpoint_every=2",
        "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scheduler=constant", "optim.lr_warmup_steps=0",
        "output.tensorboard=false", "train.gradient_accumulation_steps=1", "train.mixed_precision=no",
        "train.gradient_checkpointing=false", *extra,
    ]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _block_linears(transformer) -> list[torch.nn.Module]:
    """The layers :func:`quantize.quantize_linear_layers` swaps: every ``nn.Linear`` of the transformer blocks."""
    return [m for name in quantize.BLOCK_LISTS for block in getattr(transformer, name, []) for m in block.modules()
            if type(m) is torch.nn.Linear]


def _spy_quantizer(monkeypatch) -> list[tuple]:
    """Record each ``(transformer, kind, layers swapped)`` of the family's loader while it quantizes for real."""
    calls = []

    def spy(model, kind, compute_dtype=torch.float32):
        count = quantize.quantize_linear_layers(model, kind, compute_dtype=compute_dtype)
        calls.append((model, kind, count))
        return count

    monkeypatch.setattr(rectified_flow, "quantize_linear_layers", spy)
    return calls


@pytest.mark.parametrize("family, quantization", [("sd3", "nf4"), ("flux", "nf4"), ("flux", "int8")])
def test_quantized_run_starts_at_ln2_and_its_adapter_loads_on_the_full_precision_base(
        family, quantization, request, photo_pairs, tmp_path, monkeypatch):
    """Through the CLI: step 0 is ln 2 (LoRA B = 0, so the policy is the adapter-disabled reference, bit for bit);
    PEFT wrapped the 4/8-bit layers with its bitsandbytes LoRA layers and trained LoRA only; the exported adapter
    loads with ``pipe.load_lora_weights`` on the unquantized pipeline, bit-equal to the trained weights."""
    model = request.getfixturevalue(f"tiny_{family}")
    calls = _spy_quantizer(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", str(RECIPES[family]),
                 *_args(model, photo_pairs, out, f"model.quantization={quantization}")]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # -log σ(0) in fp32: ln 2 rounded to float32, within an ulp of 1 (2^-23)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=EPS32)
    assert rows[0]["rewards/margins"] == 0 and rows[0]["mse/chosen"] == rows[0]["ref_mse/chosen"]
    assert rows[-1]["rewards/margins"] != 0  # the adapter moved

    pipe = pipeline_class(family).from_pretrained(model)  # fp32, no quantization
    [(trained, kind, count)] = calls
    assert kind == quantization and count == len(_block_linears(pipe.transformer)) > 0
    lora_layer, base_layer, packed = {"nf4": (lora_bnb.Linear4bit, bnb.nn.Linear4bit, torch.uint8),
                                      "int8": (lora_bnb.Linear8bitLt, bnb.nn.Linear8bitLt, torch.int8)}[quantization]
    wrapped = [m for m in trained.modules() if isinstance(m, lora_layer)]
    assert wrapped and all(type(m.get_base_layer()) is base_layer for m in wrapped)
    assert all(m.get_base_layer().weight.dtype == packed for m in wrapped)  # still packed after training
    plain = [n for blocks in quantize.BLOCK_LISTS if hasattr(trained, blocks)
             for n, m in getattr(trained, blocks).named_modules() if type(m) is torch.nn.Linear and ".lora_" not in n]
    assert plain == []  # in the blocks, only the LoRA matrices are full-precision linear layers
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == \
        {n for n, _ in trained.named_parameters() if ".lora_" in n}

    final = load_file(out / CKPT.format(3))
    live = lora_state_dict(trained)
    assert final.keys() == live.keys() and all(torch.equal(final[k], live[k]) for k in final)
    assert any(final[k].abs().max() > 0 for k in final if "lora_B" in k)  # trained, not the zero init

    pipe.load_lora_weights(out)
    [adapter] = pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    assert loaded.keys() == final.keys()
    for key in final:
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], final[key]), key
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in pipe.transformer.modules())


def _fixed_batch(cfg):
    from lora_dpo.data.loader import build_dataloader
    from lora_dpo.data.sources import load_preference_dataset

    dataset, _ = load_preference_dataset(cfg.data)
    return next(iter(build_dataloader(dataset, cfg.data, 2, seed=0)))


@pytest.mark.parametrize("family,kind", [("sd3", "nf4"), ("flux", "nf4"), ("flux", "int8")])
def test_the_adapter_learns_on_a_fixed_batch_over_a_frozen_quantized_base(family, kind, request, photo_pairs):
    """The real micro-step with σ, ε and the VAE sample fixed (the same pair draws every step): gradients reach
    the LoRA weights only, the quantized bytes never change, the adapter-disabled reference gives the same errors at
    every step, and the policy learns to prefer x_w over x_l."""
    from accelerate import Accelerator

    from lora_dpo.training.steps import dpo_micro_step

    model = request.getfixturevalue(f"tiny_{family}")
    # one β for both (the SD3.5 recipe's β = 100 moves the implicit reward 20× less per step than FLUX's 2000)
    cfg = load_config(RECIPES[family], _args(model, photo_pairs, "unused", f"model.quantization={kind}",
                                             "loss.beta=2000"))
    batch = _fixed_batch(cfg)
    comps = load_components(cfg.model, torch.float32)
    transformer = comps.unet
    torch.manual_seed(0)  # LoRA A's random init
    params = add_lora(transformer, cfg.lora, family)
    transformer.train()
    on_quantized = [m for m in transformer.modules() if hasattr(m, "base_layer")
                    and isinstance(m.get_base_layer(), BNB_LAYER[kind])]  # PEFT wrappers of bitsandbytes layers
    assert on_quantized and all(type(m) is LORA_LAYER[kind] for m in on_quantized)
    frozen = {n: p.detach().clone() for n, p in transformer.named_parameters() if not p.requires_grad}
    assert any(t.dtype in (torch.uint8, torch.int8) for t in frozen.values())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    accelerator = Accelerator()
    history = []
    for step in range(10):  # the same batch, hence the same keyed draws, every step
        loss, m = dpo_micro_step(comps, transformer, partial(adapters_disabled, transformer), batch, cfg.loss,
                                 accelerator, torch.float32)
        optimizer.zero_grad()
        loss.mean().backward()
        if step == 0:
            with_grad = {n for n, p in transformer.named_parameters() if p.grad is not None}
            assert with_grad and all(".lora_" in n for n in with_grad)
            # at B = 0 only the B matrices get a nonzero gradient (dL/dA goes through B)
            assert any("lora_B" in n and transformer.get_parameter(n).grad.abs().max() > 0 for n in with_grad)
        optimizer.step()
        history.append((loss.mean().item(), {k: v.detach().clone() for k, v in m.items()}))
    first_loss, first = history[0]
    assert first_loss == pytest.approx(LN2, abs=EPS32)
    assert torch.equal(first["mse/chosen"], first["ref_mse/chosen"])  # LoRA B = 0: the policy is the reference
    for _, later in history[1:]:  # the frozen quantized base, with the adapter disabled, does not drift
        assert torch.equal(later["ref_mse/chosen"], first["ref_mse/chosen"])
        assert torch.equal(later["ref_mse/rejected"], first["ref_mse/rejected"])
    for name, value in transformer.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    last_loss, last = history[-1]
    losses = [loss for loss, _ in history]
    # learning the preference on one fixed draw: the loss falls at every step, to under a quarter of ln 2
    # (measured after 10 steps, LoRA seed 0: 0.048 sd3-nf4, 0.046 flux-nf4, 0.048 flux-int8)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert last_loss < LN2 / 4 and bool((last["rewards/accuracies"] == 1).all())
    assert bool((last["rewards/chosen"] > last["rewards/rejected"]).all())


def test_resume_of_a_quantized_run_is_exact(tiny_flux, photo_pairs, tmp_path):
    """4 steps straight equal 2 steps, then resumed to 4: per-step losses and the trainable weights bit-equal (the
    NF4 base is re-quantized from the same weights on load, deterministically)."""
    recipe = str(RECIPES["flux"])
    common = ("model.quantization=nf4", "train.checkpoint_every=2", "data.random_crop=true")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", recipe, *_args(tiny_flux, photo_pairs, straight, *common, "train.max_steps=4")]) == 0
    assert main(["train", recipe, *_args(tiny_flux, photo_pairs, split, *common, "train.max_steps=2")]) == 0
    assert main(["train", recipe, *_args(tiny_flux, photo_pairs, split, *common, "train.max_steps=4",
                                         "train.resume_from=latest")]) == 0
    a, b = _metrics(straight), _metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["rewards/margins"] == rb["rewards/margins"], ra["step"]
    wa, wb = load_file(straight / CKPT.format(4)), load_file(split / CKPT.format(4))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], load_file(split / CKPT.format(2))[k]) for k in wa)  # steps 3-4 moved them


def _transformer_inputs(transformer, family: str, n: int = 2, text_tokens: int = 8) -> dict:
    """Seeded inputs of a tiny transformer's forward, shaped from its config: SD3 a ``(n, C, 16, 16)`` latent;
    FLUX its packed ``(n, 64, C)`` tokens with their ids and the guidance input."""
    g = torch.Generator().manual_seed(0)
    c = transformer.config
    text = torch.randn(n, text_tokens, c.joint_attention_dim, generator=g)
    pooled = torch.randn(n, c.pooled_projection_dim, generator=g)
    if family == "sd3":
        return dict(hidden_states=torch.randn(n, c.in_channels, 16, 16, generator=g), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=torch.tensor([100.0, 700.0][:n]))
    return dict(hidden_states=torch.randn(n, 64, c.in_channels, generator=g), encoder_hidden_states=text,
                pooled_projections=pooled, timestep=torch.tensor([0.1, 0.7][:n]), img_ids=torch.zeros(64, 3),
                txt_ids=torch.zeros(text_tokens, 3), guidance=torch.full((n,), 3.5) if c.guidance_embeds else None)


def _nf4_bytes(numel: int, block: int) -> int:
    """NF4 bytes of a weight of ``numel`` values in blocks of ``block`` (bitsandbytes' layout): two 4-bit codes a
    byte, one uint8 block scale per block, one fp32 scale per 256 block scales, one fp32 offset (double
    quantization)."""
    blocks = math.ceil(numel / block)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_quantized_blocks_really_are_4_and_8_bit(family, request):
    """``quantized_bytes`` of the quantized blocks against the bytes the formats take, and their ratio to the same
    weights in bf16 (NF4 ≤ 0.30; int8 ≤ 0.5 + 2/min(in_features), its fp32 row scales). Then the NF4 codes decode,
    through bitsandbytes' own (CPU) ``dequantize_4bit``, to the original weights within NF4's rounding: half the
    widest gap of the NF4 code times the block's absmax, plus the error of the 8-bit copy of that absmax."""
    model = request.getfixturevalue(f"tiny_{family}")
    denoiser_class = get_family(family).denoiser_class
    linears = _block_linears(denoiser_class.from_pretrained(model, subfolder="transformer"))
    blocks_of = {m: quantize.nf4_block_size(m.in_features) for m in linears}
    assert None not in blocks_of.values()  # every tiny width is a multiple of 32
    bf16_bytes = 2 * sum(m.weight.numel() for m in linears)
    quantized = {}
    for kind in ("nf4", "int8"):
        transformer = denoiser_class.from_pretrained(model, subfolder="transformer")
        assert quantize.quantize_linear_layers(transformer, kind) == len(linears)
        assert getattr(transformer, {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}[kind]) is True
        blocks = torch.nn.ModuleList([getattr(transformer, n) for n in quantize.BLOCK_LISTS if hasattr(transformer, n)])
        measured = quantize.quantized_bytes(blocks)["quantized"]
        assert quantize.quantized_bytes(transformer)["quantized"] == measured  # nothing outside the blocks
        ratio = measured / bf16_bytes
        if kind == "nf4":
            assert measured == sum(_nf4_bytes(m.weight.numel(), blocks_of[m]) for m in linears)
            assert ratio <= 0.30, ratio  # 4 bits + 8-bit block scales: 0.2657 (sd3), 0.2659 (flux)
        else:
            assert measured == sum(m.weight.numel() + 4 * m.out_features for m in linears)
            assert ratio <= 0.5 + 2 / min(m.in_features for m in linears), ratio
        quantized[kind] = transformer
    code = F.get_4bit_type("nf4", device="cpu")
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    layers = [m for m in quantized["nf4"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == len(linears)
    for layer, original in zip(layers, linears):
        state = layer.weight.quant_state
        assert state.blocksize == blocks_of[original] and state.shape == original.weight.shape
        w = original.weight.detach().reshape(-1, state.blocksize)
        decoded = F.dequantize_4bit(layer.weight.data, state).reshape(-1, state.blocksize)
        absmax = w.abs().amax(dim=1)
        stored = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        # nearest code of w/absmax, times the stored absmax; fp32 rounding of values ≤ absmax: a few eps·absmax
        bound = half_gap * absmax + (stored - absmax).abs() + 4 * EPS32 * absmax
        assert bool(((decoded - w).abs() <= bound[:, None]).all()), (tuple(original.weight.shape), state.blocksize)
        assert (decoded - w).abs().max() > 0  # lossy: these are not the fp32 weights
    # eval mode runs the same frozen layers as training (bitsandbytes' CPU repacking stays off: no bf16 scales, and no
    # failure on layers narrower than a block), bit for bit, and leaves the packed weights as they were
    nf4 = quantized["nf4"]
    before = {n: t.clone() for n, t in nf4.state_dict().items()}
    kwargs = _transformer_inputs(nf4, family)
    with torch.no_grad():
        evaluated = nf4.eval()(**kwargs).sample
        trained = nf4.train()(**kwargs).sample
    assert torch.equal(evaluated, trained) and bool(evaluated.isfinite().all())
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = nf4.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _refuses_before_loading(monkeypatch, capsys, argv) -> str:
    """Run ``argv`` with every model ``from_pretrained`` (diffusers and transformers) recording instead of loading;
    return the single ``error:`` line after checking exit 2 and that no weights were asked for."""
    loads = []

    def spy(cls, *args, **kwargs):
        loads.append(cls.__name__)
        raise AssertionError(f"{cls.__name__}.from_pretrained called before the refusal")

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    assert main(argv) == 2
    assert loads == []
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, errors
    return errors[0]


def test_refusals_come_before_any_weights_load(tiny_sd3, tiny_sd15, photo_pairs, tmp_path, monkeypatch, capsys):
    """One ``error:`` line and exit 2, with no ``from_pretrained`` of any model: NF4 with full fine-tuning, NF4 on a
    UNet family (SD1.5), and NF4 without bitsandbytes."""
    full = _refuses_before_loading(monkeypatch, capsys, [
        "train", str(RECIPES["sd3"]), *_args(tiny_sd3, photo_pairs, tmp_path / "a", "model.quantization=nf4",
                                             "train.mode=full")])
    assert "model.quantization=nf4" in full and "train.mode=lora" in full
    sd15 = _refuses_before_loading(monkeypatch, capsys, [
        "train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
        *_args(tiny_sd15, photo_pairs, tmp_path / "b", "model.quantization=nf4")])
    assert "model.quantization" in sd15 and "flow-matching" in sd15
    absent = "bitsandbytes is not installed (No module named 'bitsandbytes'); pip install bitsandbytes"
    monkeypatch.setattr(quantize, "bitsandbytes_problem", lambda: absent)
    missing = _refuses_before_loading(monkeypatch, capsys, [
        "train", str(RECIPES["sd3"]), *_args(tiny_sd3, photo_pairs, tmp_path / "c", "model.quantization=nf4")])
    assert "model.quantization=nf4" in missing and "pip install bitsandbytes" in missing
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_refused_where_bitsandbytes_has_no_layers(tiny_flux, photo_pairs, tmp_path, monkeypatch, capsys):
    """A machine whose accelerator is Apple MPS (simulated: no CUDA, MPS available): one ``error:`` line, before any
    weights load."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    line = _refuses_before_loading(monkeypatch, capsys, [
        "train", str(RECIPES["flux"]), *_args(tiny_flux, photo_pairs, tmp_path / "m", "model.quantization=int8")])
    assert "model.quantization=int8" in line and "Apple MPS" in line
    assert not (tmp_path / "m").exists()

"""Training end to end through the real CLI on tiny SD1.5 and SDXL pipelines, and the exported adapter."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file

from lora_dpo.cli import main
from lora_dpo.config import LossConfig, load_config
from lora_dpo.models.adapters import adapters_disabled, add_lora, load_lora_state_dict
from lora_dpo.models.families import pipeline_class
from lora_dpo.models.loading import load_components
from lora_dpo.training import checkpoint as ckpt
from lora_dpo.training.recipe import train

ROOT = Path(__file__).resolve().parent.parent


def _args(model, data, out, *extra):
    return [
        f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=32",
        f"output.dir={out}", "train.batch_size=2", "train.max_steps=3", "train.checkpoint_every=2",
        "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scheduler=constant", "output.tensorboard=false",
        "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.gradient_checkpointing=false", *extra,
    ]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _unet_inputs(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 700])
    if family == "sd15":
        return x, t, {"encoder_hidden_states": torch.randn(2, 32, 32, generator=g)}
    return x, t, {
        "encoder_hidden_states": torch.randn(2, 32, 64, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                              "time_ids": torch.tensor([[40.0, 60, 0, 4, 32, 32]] * 2)},
    }


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cli_train_then_diffusers_loads_the_policy(family, request, photo_pairs, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / family / "lora_dpo.yaml"),
                 *_args(model, photo_pairs, out, "train.gradient_checkpointing=true", "lora.lora_alpha=16")]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # fresh adapter: policy = reference
    assert rows[0]["rewards/margins"] == 0 and rows[0]["rewards/accuracies"] == 0
    for key in ("rewards/chosen", "rewards/rejected", "mse/chosen", "ref_mse/rejected", "learning_rate",
                "grad_norm", "pairs_per_second", "peak_memory_gb"):
        assert key in rows[-1]
    for name in ("pytorch_lora_weights.safetensors", "recipe.yaml", "README.md", "data_report.json",
                 "checkpoints/step_2/trainer_state.json", "checkpoints/step_3/trainer_state.json"):
        assert (out / name).is_file(), name
    assert load_config(out / "recipe.yaml").lora.lora_alpha == 16
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 8 and meta["unet.lora_alpha"] == 16
    card = ModelCard.load(out / "README.md")  # Hugging Face model-card conventions, read by huggingface_hub
    assert card.data.base_model == str(model) and card.data.library_name == "diffusers"
    assert card.data.base_model_relation == "adapter" and card.data.pipeline_tag == "text-to-image"
    assert {"lora", "diffusion-dpo", "text-to-image"} <= set(card.data.tags) and card.data.license == "other"
    assert f"{pipeline_class(family).__name__}.from_pretrained" in card.text and "load_lora_weights" in card.text

    # The trained policy, rebuilt from the final checkpoint through the kit's own loader.
    cfg = load_config(out / "recipe.yaml")
    comps = load_components(cfg.model, torch.float32)
    add_lora(comps.unet, cfg.lora)
    load_lora_state_dict(comps.unet, load_file(out / "checkpoints/step_3/trainable_weights.safetensors"))
    # A fresh diffusers pipeline with the exported adapter reproduces it; the base alone does not.
    pipe = pipeline_class(family).from_pretrained(model)
    x, t, kw = _unet_inputs(family)
    with torch.no_grad():
        base_out = pipe.unet(x, t, **kw).sample
        pipe.load_lora_weights(out)
        loaded = pipe.unet(x, t, **kw).sample
        policy = comps.unet(x, t, **kw).sample
    assert torch.allclose(loaded, policy, atol=1e-6, rtol=0)
    assert (loaded - base_out).abs().max() > 1e-5


def test_only_lora_parameters_change(tiny_sd15, photo_pairs, tmp_path):
    cfg = load_config(None, _args(tiny_sd15, photo_pairs, tmp_path / "run"))
    result = train(cfg)
    base = load_components(cfg.model, torch.float32).unet.state_dict()
    trained = result.model.state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys and all(trained[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    for key, value in trained.items():
        if "lora_" in key:
            continue
        base_key = key.replace(".base_layer", "")
        assert torch.equal(value, base[base_key]), key


def test_resume_is_exact(tiny_sd15, photo_pairs, tmp_path):
    common = ("train.checkpoint_every=2", "optim.lr_scheduler=constant_with_warmup", "optim.lr_warmup_steps=1",
              "data.random_crop=true", "data.caption_dropout=0.3")
    straight = tmp_path / "straight"
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, photo_pairs, straight, *common, "train.max_steps=4")]) == 0
    split = tmp_path / "split"
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, photo_pairs, split, *common, "train.max_steps=2")]) == 0
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, photo_pairs, split, *common, "train.max_steps=4", "train.resume_from=latest")]) == 0
    a, b = _metrics(straight), _metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["rewards/margins"] == rb["rewards/margins"], ra["step"]
    wa = load_file(straight / "pytorch_lora_weights.safetensors")
    wb = load_file(split / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_sd15, photo_pairs, tmp_path, capsys):
    args = _args(tiny_sd15, photo_pairs, tmp_path / "run", "train.max_steps=2")
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"), *args]) == 0
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"), *args]) == 2
    assert "train.resume_from=latest" in capsys.readouterr().err
    assert (tmp_path / "run/checkpoints/step_2").is_dir()


def test_messy_dataset_trains_and_reports_counts(tiny_sd15, messy_pairs, tmp_path):
    path, expected = messy_pairs
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, path, out, "train.max_steps=8", "train.batch_size=4")]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows"] == expected["rows"]
    assert report["kept"] == expected["good"] + expected["truncated"]
    assert report["skipped"]["tie"] == expected["ties"]
    assert report["skipped"]["undecodable_image"] == expected["undecodable_at_load"]
    # 20 kept rows / 4 per batch = 5 batches per epoch; 8 steps run 2 epochs: the truncated row is met twice
    assert report["skipped_in_training"]["undecodable_image"] == 2
    assert _metrics(out)[-1]["data/skipped_rows"] == 2


def test_bf16_mixed_precision_with_accumulation(tiny_sdxl, photo_pairs, tmp_path):
    cfg = load_config(None, _args(tiny_sdxl, photo_pairs, tmp_path / "run", "train.mixed_precision=bf16",
                                  "train.gradient_accumulation_steps=2", "train.max_steps=2"))
    result = train(cfg)
    rows = _metrics(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # bf16 UNet, fp32 errors: still exactly ln 2
    lora = [p for n, p in result.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for n, p in result.model.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)


def test_adamw8bit_trains(tiny_sd15, photo_pairs, tmp_path):
    # r=64 makes the 64-wide layers' LoRA matrices 4096 elements: bitsandbytes' threshold for 8-bit state
    cfg = load_config(None, _args(tiny_sd15, photo_pairs, tmp_path / "run", "optim.name=adamw8bit", "lora.r=64",
                                  "train.max_steps=2", "train.checkpoint_every=1"))
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.final_metrics.values())
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    state = torch.load(tmp_path / "run/checkpoints/step_2/optimizer.pt", weights_only=True)["state"]
    quant = [s["__bnb_optimizer_quant_state__"] for s in state.values()]
    big = [q for q in quant if q["state1"].numel() >= 4096]  # bnb keeps smaller tensors in 32 bit
    assert big and all(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in big)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_sd15, photo_pairs, tmp_path, capsys):
    # warm-up from lr 0: step 1 leaves the weights as they are, step 2 throws them to ~1e29, step 3's loss is NaN
    out = tmp_path / "run"
    code = main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, photo_pairs, out, "optim.lr=1e30", "optim.max_grad_norm=null",
                        "optim.lr_scheduler=constant_with_warmup", "optim.lr_warmup_steps=10",
                        "train.max_steps=10", "train.checkpoint_every=1")])
    assert code == 1
    err = capsys.readouterr().err
    assert "at step 3" in err and f"Last good checkpoint: {out / 'checkpoints/step_1'}" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_1"]
    assert ckpt.resolve_resume("latest", out) == out / "checkpoints/step_1"
    assert (out / "checkpoints/rejected-step_2/REJECTED.txt").is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    last = load_file(out / "checkpoints/step_1/trainable_weights.safetensors")
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in last.values())


def test_sigterm_saves_a_checkpoint_and_exits(tiny_sd15, photo_pairs, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_dpo.cli", "train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
           *_args(tiny_sd15, photo_pairs, out, "train.max_steps=10000", "train.checkpoint_every=5000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "resume_from=latest" in output
    state = json.loads((out / "checkpoints" / (out / "checkpoints/latest").read_text() / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 10000


def test_dpo_step_learns_the_preference_on_a_fixed_draw(tiny_sd15, photo_pairs):
    """The real micro-step, with t, ε and the VAE sample fixed: the policy learns to prefer x_w over x_l."""
    from accelerate import Accelerator

    from lora_dpo.data.loader import build_dataloader
    from lora_dpo.data.sources import load_preference_dataset
    from lora_dpo.training.steps import dpo_micro_step

    cfg = load_config(None, _args(tiny_sd15, photo_pairs, "unused"))
    dataset, _ = load_preference_dataset(cfg.data)
    batch = next(iter(build_dataloader(dataset, cfg.data, 4, seed=0)))
    comps = load_components(cfg.model, torch.float32)
    params = add_lora(comps.unet, cfg.lora)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    accelerator = Accelerator()
    history = []
    for _ in range(15):  # the same batch, hence the same keyed draws, every step
        loss, m = dpo_micro_step(comps, comps.unet, partial(adapters_disabled, comps.unet), batch, LossConfig(),
                                 accelerator, torch.float32)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        history.append((loss.mean().item(), m))
    assert history[0][0] == pytest.approx(math.log(2), abs=1e-6)
    last_loss, last = history[-1]
    assert last_loss < 0.3 and last["rewards/accuracies"].mean().item() == 1.0
    # the preferred images' error fell relative to the reference more than the rejected images' error did
    assert (last["rewards/chosen"] > last["rewards/rejected"]).all()


def test_checkpoint_retention_and_tensorboard(tiny_sd15, photo_pairs, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, photo_pairs, out, "train.max_steps=5", "train.checkpoint_every=1",
                        "train.checkpoints_total_limit=2", "output.tensorboard=true", "train.log_every=2")]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_4", "step_5"]
    assert (out / "checkpoints/latest").read_text() == "step_5"
    assert [r["step"] for r in _metrics(out)] == [1, 2, 4, 5]  # step 1, every log_every, and the last
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("rewards/accuracies")] == [1, 2, 4, 5]


def test_v_prediction_target(tiny_sd15, photo_pairs, tmp_path):
    cfg = load_config(None, _args(tiny_sd15, photo_pairs, tmp_path / "run", "model.prediction_type=v_prediction",
                                  "train.max_steps=1"))
    comps = load_components(cfg.model, torch.float32)
    from lora_dpo.models.loading import training_target

    z, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    alpha = comps.noise_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - comps.noise_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(training_target(comps, z, eps, t), alpha * eps - sigma * z, atol=1e-6)
    assert train(cfg).final_metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_sft_trains_on_preferred_images_without_reference(tiny_sd15, photo_pairs, tmp_path):
    """loss.type=sft: one policy pass over the B preferred images per micro-step, no reference pass."""
    from lora_dpo.data.loader import build_dataloader
    from lora_dpo.data.sources import load_preference_dataset
    from lora_dpo.training.steps import dpo_micro_step

    cfg = load_config(None, _args(tiny_sd15, photo_pairs, tmp_path / "run", "loss.type=sft", "train.max_steps=2"))
    result = train(cfg)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and "rewards/margins" not in rows[0]
    assert rows[0]["loss"] == pytest.approx(rows[0]["mse/chosen"])
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)

    from accelerate import Accelerator

    dataset, _ = load_preference_dataset(cfg.data)
    batch = next(iter(build_dataloader(dataset, cfg.data, 2, seed=0)))
    calls = []
    handle = result.model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        sft, _ = dpo_micro_step(_components(cfg, result.model), result.model, None, batch, cfg.loss, Accelerator(),
                                torch.float32)
    finally:
        handle.remove()
    assert calls == [2] and sft.shape == (2,)


def _components(cfg, unet):
    comps = load_components(cfg.model, torch.float32)
    comps.unet = unet
    return comps

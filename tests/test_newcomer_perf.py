"""A newcomer's first runs: the adapter fused for sampling (same images, weights restored bit for bit), one
progress bar over an evaluation, the demo's torch thread count. No timing is asserted here; the timings are
``benchmarks/sampling_cost.py`` and ``benchmarks/demo_threads.py``."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_random_lora

from lora_dpo.cli import demo as demo_cli
from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.evaluation.run import evaluate_run
from lora_dpo.inference.sampling import fused_adapters, generate_images, load_pipeline
from lora_dpo.models.lora_files import WEIGHT_NAME, load_adapter
from lora_dpo.world import demo

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a handwritten digit seven", "a photo of a cat"]


def _params(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, model in pipe.components.items()
            if isinstance(model, torch.nn.Module) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tuned_pipe(tiny_sd15, tmp_path_factory):
    """The tiny SD1.5 pipeline with a random rank-8 adapter loaded as ``lora-dpo eval`` loads it."""
    lora = save_random_lora(tmp_path_factory.mktemp("fuse") / "lora", tiny_sd15, "sd15", r=8, lora_alpha=8, std=0.2)
    pipe = load_pipeline(tiny_sd15)
    base = generate_images(pipe, PROMPTS, [1, 2], num_inference_steps=3, height=32, width=32)
    load_adapter(pipe, lora / WEIGHT_NAME, "tuned")
    return pipe, base


def test_fused_unet_is_as_accurate_as_unfused_and_weights_come_back_bit_exact(tuned_pipe):
    """One UNet forward, fused and unfused, against the same forward in float64 (the exact value to fp32's eyes).
    Fusing changes only the order of the sums, so its fp32 error is of the order of the unfused fp32 error: the
    tolerance is that measured error (times 4 for the different count of roundings), not a guessed constant."""
    pipe, _ = tuned_pipe
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 700])
    before = _params(pipe)
    with torch.no_grad():
        unfused = unet(x, t, text).sample
        with fused_adapters(pipe) as fused_layers:
            fused = unet(x, t, text).sample
        again = unet(x, t, text).sample
        exact = copy.deepcopy(unet).double()(x.double(), t, text.double()).sample
    after = _params(pipe)
    assert fused_layers > 0
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(again, unfused)  # unfused and active again: the same computation as before the block
    err_unfused = (unfused.double() - exact).abs().max().item()
    err_fused = (fused.double() - exact).abs().max().item()
    eps = torch.finfo(torch.float32).eps
    assert 0 < err_unfused < 1e3 * eps * exact.abs().max().item()  # fp32 rounding level, not a bug
    assert err_fused <= 4 * err_unfused, (err_fused, err_unfused)
    assert (unfused - fused).abs().max().item() <= 5 * err_unfused


def test_fused_sampling_gives_the_unfused_images_and_restores_on_error(tuned_pipe):
    """Sampled images, fused and unfused: within one level of 255 (a float difference of rounding size can move a
    pixel across one quantisation step, no further), and clearly not the base images. An error inside the block
    still puts the weights back."""
    pipe, base = tuned_pipe
    unfused = generate_images(pipe, PROMPTS, [1, 2], num_inference_steps=3, height=32, width=32)
    with fused_adapters(pipe):
        fused = generate_images(pipe, PROMPTS, [1, 2], num_inference_steps=3, height=32, width=32)
    for f, u, b in zip(fused, unfused, base):
        f, u, b = (np.asarray(im, dtype=np.int16) for im in (f, u, b))
        assert np.abs(f - u).max() <= 1
        assert np.abs(u - b).max() > 10  # the adapter matters: the check above is not vacuous
    before = _params(pipe)
    with pytest.raises(RuntimeError, match="boom"), fused_adapters(pipe):
        raise RuntimeError("boom")
    after = _params(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in pipe.unet.modules())


def test_evaluation_shows_one_progress_bar(tiny_sd15, photo_pairs, tmp_path, capfd):
    """The evaluation's stderr holds one bar (``eval: ...``) over base images, tuned images and held-out pairs; no
    sampler or loading bar."""
    cfg = load_config(ROOT / "recipes/sd15/lora_dpo.yaml", [
        f"model.pretrained_model_name_or_path={tiny_sd15}", f"data.dataset={photo_pairs}", "data.resolution=32"])
    run = tmp_path / "run"
    save_random_lora(run, tiny_sd15, "sd15", r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha,
                     target_modules=cfg.lora.target_modules)
    (run / "recipe.yaml").write_text(cfg.to_yaml())
    capfd.readouterr()
    evaluate_run(run, scorer_spec="jpeg", prompts=PROMPTS, seeds_per_prompt=2, heldout_pairs=photo_pairs,
                 max_heldout_pairs=3, num_inference_steps=2, batch_size=2, implicit_draws=1, progress=True)
    err = capfd.readouterr().err
    bars = [seg.strip() for seg in re.split(r"[\r\n]", err) if re.search(r"\d+/\d+ \[", seg)]
    assert bars, err[-2000:]
    assert all(b.startswith("eval") for b in bars), [b for b in bars if not b.startswith("eval")][:3]
    assert "11/11" in bars[-1]  # 4 base + 4 tuned images + 3 held-out pairs
    assert any(b.startswith("eval: tuned images") for b in bars) and "implicit reward" in bars[-1]
    shutil.rmtree(run)


def test_demo_runs_in_its_thread_count_and_restores_it(monkeypatch, tmp_path):
    seen = {}

    class Result:
        run_dir, step, adapter_path = tmp_path, 1, tmp_path / WEIGHT_NAME

    def fake_train(cfg):
        seen["train"] = torch.get_num_threads()
        return Result()

    def fake_eval(run_dir, **kwargs):
        seen["eval"], seen["progress"] = torch.get_num_threads(), kwargs["progress"]
        return {}

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "evaluate_run", fake_eval)
    outside = torch.get_num_threads()
    _, report = demo.train_and_evaluate(num_threads=2)
    assert seen == {"train": 2, "eval": 2, "progress": True} and report["torch_threads"] == 2
    assert torch.get_num_threads() == outside
    torch.set_num_threads(2)
    try:
        demo.train_and_evaluate()  # the default
        assert seen["train"] == seen["eval"] == (demo.DEMO_NUM_THREADS or 2)
    finally:
        torch.set_num_threads(outside)
    with pytest.raises(ValueError):
        demo.train_and_evaluate(num_threads=0)

    calls = []
    monkeypatch.setattr(demo_cli, "train_and_evaluate", lambda **kw: calls.append(kw) or (Result(), {}))
    monkeypatch.setattr(demo_cli, "format_summary", lambda report: "")
    assert main(["demo", "--threads", "2", "train.max_steps=1"]) == 0
    assert main(["demo"]) == 0
    assert main(["demo", "--world", "digits-sd3"]) == 0
    assert calls == [{"overrides": ["train.max_steps=1"], "num_threads": 2, "world": "digits"},
                     {"overrides": [], "num_threads": demo.DEMO_NUM_THREADS, "world": "digits"},
                     {"overrides": [], "num_threads": demo.DEMO_NUM_THREADS, "world": "digits-sd3"}]
    with pytest.raises(SystemExit):
        main(["demo", "--world", "digits-xl"])
    with pytest.raises(SystemExit):
        main(["demo", "--threads", "0"])


def test_fusing_two_adapters_at_their_scales_matches_unfused(tiny_sd15, tmp_path):
    """``lora-dpo generate --adapter A:0.5 --adapter B:0.8`` fuses both at their scales: one UNet forward fused and
    unfused agree to the fp32 rounding of the unfused forward (measured against float64, as above)."""
    pipe = load_pipeline(tiny_sd15)
    for i, (name, seed) in enumerate((("a", 1), ("b", 2))):
        torch.manual_seed(seed)
        lora = save_random_lora(tmp_path / name, tiny_sd15, "sd15", r=4, lora_alpha=4, std=0.2)
        load_adapter(pipe, lora / WEIGHT_NAME, f"adapter{i}")
    pipe.set_adapters(["adapter0", "adapter1"], [0.5, 0.8])
    unet, g = pipe.unet, torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        unfused = unet(x, t, text).sample
        with fused_adapters(pipe) as layers:
            fused = unet(x, t, text).sample
        exact = copy.deepcopy(unet).double()(x.double(), t, text.double()).sample
        pipe.set_adapters(["adapter0"], [0.5])  # a different mix gives a different output: the scales were used
        other = unet(x, t, text).sample
    err_unfused = (unfused.double() - exact).abs().max().item()
    assert layers > 0 and 0 < err_unfused
    assert (fused.double() - exact).abs().max().item() <= 4 * err_unfused
    assert (other - unfused).abs().max().item() > 100 * err_unfused

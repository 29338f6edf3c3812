"""Every loss.type (and option) trains through the real CLI; at step 1 (a fresh adapter: policy = reference) each
loss has its zero-margin value; MaPO and SFT run no reference pass."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import ROOT, _args, _components, _metrics

from lora_dpo.cli import main
from lora_dpo.config import ConfigError, LossConfig, load_config


@pytest.mark.parametrize("options, at_zero_margin", [
    (["loss.label_smoothing=0.1"], lambda r: math.log(2)),  # conservative DPO: ln 2 at u = 0 as well
    (["loss.type=ipo", "loss.beta=50"], lambda r: (1 / (2 * 50)) ** 2),  # (h - 1/(2β))² at h = 0
    (["loss.type=hinge"], lambda r: 1.0),  # max(0, 1 - u) at u = 0
    # MaPO has no reference: its margin is between the two images from step 1 on; one pair a step, so the logged
    # means are that pair's values: e_w - β·log σ(margin)
    (["loss.type=mapo", "train.batch_size=1"],
     lambda r: r["mse/chosen"] + 0.1 * math.log1p(math.exp(-r["rewards/margins"]))),
    (["loss.sdpo_mu=0.6"], lambda r: math.log(2)),  # the safeguard changes gradients, not the value
    (["loss.sft_weight=0.5"], lambda r: math.log(2) + 0.5 * r["mse/chosen"]),  # plus the anchor
], ids=["label_smoothing", "ipo", "hinge", "mapo", "sdpo", "sft_anchor"])
def test_each_loss_trains_through_the_cli(options, at_zero_margin, tiny_sd15, photo_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, photo_pairs, out, "train.max_steps=2", *options)]) == 0
    first, last = _metrics(out)
    assert first["loss"] == pytest.approx(at_zero_margin(first), rel=1e-5, abs=1e-9)
    assert math.isfinite(last["loss"]) and "rewards/margins" in last and "grad_norm" in last
    if "loss.sdpo_mu=0.6" in options:
        assert 0.0 <= last["sdpo/loser_scale"] <= 1.0
    card = (out / "README.md").read_text()
    loss_options = dict(o.removeprefix("loss.").split("=") for o in options if o.startswith("loss."))
    assert LossConfig(**loss_options).describe() in card


def run_counting_unet_calls(step, cfg, batch):
    """Build ``cfg``'s policy and run one micro-step ``step`` (``dpo_micro_step`` / ``kto_micro_step``) on ``batch``;
    returns the batch sizes of the UNet calls in order, and the step's ``(loss, metrics)``."""
    from accelerate import Accelerator

    from lora_dpo.training.setup import setup_policy

    components, policy, dtype = setup_policy(cfg, "cpu")
    calls = []
    handle = policy.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        result = step(_components(cfg, policy.unet), policy.unet, policy.reference, batch, cfg.loss, Accelerator(),
                      dtype)
    finally:
        handle.remove()
    return calls, result


def _count_unet_calls(loss_cfg, tiny_sd15, photo_pairs, tmp_path):
    from lora_dpo.data.loader import build_dataloader
    from lora_dpo.data.sources import load_preference_dataset
    from lora_dpo.training.steps import dpo_micro_step

    cfg = load_config(None, _args(tiny_sd15, photo_pairs, tmp_path / "run"))
    cfg = cfg.model_copy(update={"loss": loss_cfg})
    dataset, _ = load_preference_dataset(cfg.data)
    batch = next(iter(build_dataloader(dataset, cfg.data, 2, seed=0)))
    calls, (loss, _) = run_counting_unet_calls(dpo_micro_step, cfg, batch)
    return calls, loss


def test_mapo_runs_no_reference_pass(tiny_sd15, photo_pairs, tmp_path):
    calls, loss = _count_unet_calls(LossConfig(type="mapo"), tiny_sd15, photo_pairs, tmp_path)
    assert calls == [4] and loss.shape == (2,)  # the policy on both images of 2 pairs, and nothing else
    calls, _ = _count_unet_calls(LossConfig(), tiny_sd15, photo_pairs, tmp_path)
    assert calls == [4, 4]  # Diffusion-DPO: the reference pass, then the policy pass


def test_mapo_full_mode_keeps_no_reference_copy(tiny_sd15, photo_pairs, tmp_path):
    from lora_dpo.training.setup import setup_policy

    full = ["train.mode=full", "optim.lr=1e-5"]
    _, policy, _ = setup_policy(load_config(None, _args(tiny_sd15, photo_pairs, tmp_path / "a", "loss.type=mapo", *full)), "cpu")
    assert policy.frozen_reference is None
    _, policy, _ = setup_policy(load_config(None, _args(tiny_sd15, photo_pairs, tmp_path / "b", *full)), "cpu")
    assert isinstance(policy.frozen_reference, torch.nn.Module)


@pytest.mark.parametrize("bad, message", [
    (["loss.type=hinge", "loss.label_smoothing=0.1"], "label_smoothing applies to loss.type=sigmoid"),
    (["loss.type=mapo", "loss.sdpo_mu=0.5"], "sdpo_mu"),
    (["loss.type=sft", "loss.sft_weight=1"], "sft_weight"),
    (["loss.label_smoothing=0.5"], "label_smoothing"),
    (["loss.sdpo_mu=1"], "sdpo_mu"),
])
def test_options_that_do_not_fit_the_loss_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "recipes/sd15/lora_dpo.yaml", bad)


def test_margins_by_timestep_bucket_and_the_rising_errors_warning():
    from lora_dpo.training.diagnostics import BothErrorsRising, ratio_means, timestep_bucket_sums

    margins, t = torch.tensor([1.0, 3.0, -2.0, 5.0]), torch.tensor([10, 240, 260, 999])
    sums = timestep_bucket_sums(margins, t, 1000)
    assert sums["rewards/margins_t0-249:sum"].item() == 4.0 and sums["rewards/margins_t0-249:count"].item() == 2
    assert sums["rewards/margins_t500-749:count"].item() == 0
    # the loop divides every total by the step's example count: the ratio is unchanged, other metrics pass through
    means = ratio_means({"loss": 0.7, **{k: v.item() / 4 for k, v in sums.items()}})
    assert means == {"loss": 0.7, "rewards/margins_t0-249": 2.0, "rewards/margins_t250-499": -2.0,
                     "rewards/margins_t750-999": 5.0}

    watch = BothErrorsRising(window=3)
    assert watch.update({"rewards/chosen": -1.0, "rewards/rejected": -1.0}) is None  # window not full yet
    assert watch.update({"rewards/chosen": 0.5, "rewards/rejected": -2.0}) is None
    warning = watch.update({"rewards/chosen": -0.1, "rewards/rejected": -3.0})  # means -0.2 and -2: both rising
    assert warning and "loss.sdpo_mu" in warning and watch.flag == 1.0
    assert watch.update({"rewards/chosen": -1.0, "rewards/rejected": -1.0}) is None  # warned once
    watch.update({"rewards/chosen": 5.0, "rewards/rejected": -1.0})
    assert watch.flag == 0.0  # the preferred images' error fell again
    kto = BothErrorsRising(window=1, unpaired=True).update({"rewards/chosen": -1.0, "rewards/rejected": -2.0})
    assert "desirable images" in kto and "sdpo_mu" not in kto  # KTO's wording: no safeguard that does not apply


def test_the_run_logs_the_diagnostics(tiny_sd15, photo_pairs, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
                 *_args(tiny_sd15, photo_pairs, out, "train.max_steps=2", "train.batch_size=4")]) == 0
    for row in _metrics(out):
        buckets = {k: v for k, v in row.items() if k.startswith("rewards/margins_t")}
        assert buckets and row["diagnostics/both_errors_rising"] in (0.0, 1.0)
        if row["step"] == 1:
            assert all(v == pytest.approx(0.0, abs=1e-9) for v in buckets.values())  # fresh adapter: u = 0

"""Several processes (torchrun, gloo on the CPU) train what one process trains with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.config import LossConfig

ROOT = Path(__file__).resolve().parent.parent
# 2 processes × 2 pairs, over 6 steps of a 16-pair set: 4 steps an epoch, so the run crosses an epoch boundary.
BASE = ["data.resolution=32", "data.max_pairs=16", "train.max_steps=6", "train.checkpoint_every=3",
        "optim.name=adamw", "optim.lr=1e-4", "optim.lr_scheduler=constant", "output.tensorboard=false",
        "train.mixed_precision=no", "train.gradient_checkpointing=false", "data.caption_dropout=0.2",
        "train.gradient_accumulation_steps=1"]
# Float sums in another order (DDP averages two half-batch gradients; one process means over the whole batch) differ
# in the last bits (step 1: gradient norms equal to 1e-7); β = 5000 and Adam's normalisation carry that into the
# weights. Measured after 6 steps, ‖ΔB‖ / ‖B‖ over the LoRA B matrices: 4.5e-4 (2 processes), 4.2e-5 (1 process
# accumulating); 0.01% of the elements differ by more than 1e-6 (gradients near zero, where Adam's step flips).
TOLERANCE = 2e-3


def _train(model, data, out, *extra, processes=1, ok=True):
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, "-m", "lora_dpo.cli", "train", str(ROOT / "recipes/sd15/lora_dpo.yaml"),
           f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", f"output.dir={out}", *BASE, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(tiny_sd15, photo_pairs, tmp_path):
    one = tmp_path / "one"
    _train(tiny_sd15, photo_pairs, one, "train.batch_size=4")
    accumulated = tmp_path / "accumulated"  # 1 process, 2 pairs × 2 accumulation steps: the same global batch
    _train(tiny_sd15, photo_pairs, accumulated, "train.batch_size=2", "train.gradient_accumulation_steps=2")
    two = tmp_path / "two"  # 2 processes × 2 pairs, stopped after 3 steps, then resumed with 2 processes
    proc = _train(tiny_sd15, photo_pairs, two, "train.batch_size=2", "train.max_steps=3", processes=2)
    assert "× 2 processes" in proc.stderr and proc.stdout.count("done: 3 steps") == 1  # one run, one report
    refused = _train(tiny_sd15, photo_pairs, two, "train.batch_size=2", "train.resume_from=latest", ok=False)
    assert "saved by 2 process(es)" in refused.stderr and "Resume with the same number of processes" in refused.stderr
    _train(tiny_sd15, photo_pairs, two, "train.batch_size=2", "train.resume_from=latest", processes=2)

    reference = load_file(one / "pytorch_lora_weights.safetensors")
    b_keys = [k for k in reference if "lora_B" in k]  # zero at the start: all of it is training
    trained = torch.cat([reference[k].flatten() for k in b_keys])
    assert trained.abs().max() > 1e-4  # the adapter trained: the comparison is not between two zero tensors
    for run in (accumulated, two):
        weights = load_file(run / "pytorch_lora_weights.safetensors")
        assert weights.keys() == reference.keys()
        diff = torch.cat([weights[k].flatten() for k in b_keys]) - trained
        assert diff.norm() / trained.norm() < TOLERANCE, run.name
        for k in reference:  # A matrices barely move from their shared initialisation
            torch.testing.assert_close(weights[k], reference[k], atol=1e-4, rtol=0)
        # Per-step metrics are means over the global batch, reduced across processes: the same 4 pairs a step
        # (2 processes holding the same 2 pairs would give other means), and the same draws for each pair.
        for a, b in zip(_metrics(one), _metrics(run), strict=True):
            assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
            for key in ("loss", "rewards/margins", "rewards/accuracies", "mse/chosen", "ref_mse/rejected"):
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-3), (run.name, a["step"], key)
    assert _metrics(one)[-1]["epoch"] == 1  # 16 pairs / 4 a step: steps 5 and 6 are in the second epoch


def test_draws_are_keyed_by_pair_not_by_batch():
    """The same pair draws the same posterior samples, noise and timestep in any batch; other pairs, other draws."""
    from lora_dpo.data.draws import TRAIN_SALT, draw_seed, pair_draws

    seeds = [draw_seed(TRAIN_SALT, 0, 0, i) for i in range(4)]
    eps, noise, t = pair_draws(seeds, (4, 8, 8), 1000)
    assert eps.shape == (8, 4, 8, 8) and noise.shape == (4, 4, 8, 8) and t.shape == (4,)
    eps_2, noise_2, t_2 = pair_draws(seeds[2:], (4, 8, 8), 1000)  # pairs 2, 3 alone, as a second process holds them
    assert torch.equal(eps_2, torch.cat([eps[2:4], eps[6:8]])) and torch.equal(noise_2, noise[2:]) and torch.equal(t_2, t[2:])
    assert not torch.equal(eps[0], eps[4])  # preferred and rejected images: their own posterior samples
    assert len(set(t.tolist())) > 1 and not torch.equal(noise[0], noise[1])
    assert draw_seed(TRAIN_SALT, 0, 1, 0) != seeds[0]  # the next epoch draws anew


def test_accelerate_configs_load_and_leave_precision_and_batch_to_the_recipe():
    """The example configs are valid for accelerate's own loader; the DeepSpeed file leaves to the recipe what the
    recipe sets (its "auto" values are filled from it), and the others say mixed precision is the recipe's."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = ROOT / "recipes/accelerate"
    kinds = {}
    for path in sorted(folder.glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = config.distributed_type.value
        assert config.mixed_precision in (None, "no") and config.use_cpu is False, path.name
        if config.deepspeed_config:
            ds = json.loads((ROOT / config.deepspeed_config["deepspeed_config_file"]).read_text())
            assert ds["zero_optimization"]["stage"] == 2
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
                assert ds[key] == "auto", key
    assert kinds == {"ddp": "MULTI_GPU", "ddp_multinode": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}


def test_kto_with_two_processes_trains_what_one_process_trains(tiny_sd15, photo_pairs, tmp_path):
    """KTO's images are sharded and drawn like pairs, and its reference point z is the mean over every process."""
    kto = ["loss.type=kto", "train.max_steps=3", "data.max_pairs=8"]  # 16 labeled images, 8 a step
    one, two = tmp_path / "one", tmp_path / "two"
    _train(tiny_sd15, photo_pairs, one, *kto, "train.batch_size=8")
    _train(tiny_sd15, photo_pairs, two, *kto, "train.batch_size=4", processes=2)
    reference = load_file(one / "pytorch_lora_weights.safetensors")
    b_keys = [k for k in reference if "lora_B" in k]
    trained = torch.cat([reference[k].flatten() for k in b_keys])
    assert trained.abs().max() > 1e-4
    weights = load_file(two / "pytorch_lora_weights.safetensors")
    diff = torch.cat([weights[k].flatten() for k in b_keys]) - trained
    assert diff.norm() / trained.norm() < TOLERANCE
    # The metrics' tolerances, from where the two runs differ. Each image's error e (an fp32 mean over its latent) comes
    # from a UNet pass over another grouping (4 images on each of 2 processes, 8 on one), which rounds e in its last
    # bit (1 ulp, measured in test_cache); allow δe = 2 ulp(e) per error. Then g = e_ref - e_θ and z (a mean of g)
    # are off by at most 2δe each, and: rewards = β·g by 2βδe; kl = z by 2δe; mse = e_θ by δe; the loss
    # λ(1 - σ(±β(g - z))), whose slope in g and z is at most λβ/4, by λβ/4·4δe. The adapters differ too (‖ΔB‖/‖B‖
    # ~4e-5), but g is first order in them: 4e-5·|g| ~ 1e-8, far below δe. Measured: rewards 4e-5 against 4.8e-4.
    beta = LossConfig().kto_beta  # the default, as trained; λ = 1
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        delta_e = 2 * float(numpy.spacing(numpy.float32(max(a["mse/chosen"], a["mse/rejected"]))))  # 2 ulp of fp32 e
        bounds = {"rewards/chosen": 2 * beta * delta_e, "rewards/rejected": 2 * beta * delta_e, "kl": 2 * delta_e,
                  "mse/chosen": delta_e, "loss": beta * delta_e}
        for key, bound in bounds.items():
            assert abs(b[key] - a[key]) <= bound, (a["step"], key, a[key], b[key], bound)

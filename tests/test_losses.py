"""The Diffusion-DPO loss against values derived by hand (DESIGN.md §1)."""

import math

import pytest
import torch

from lora_dpo.losses import diffusion_dpo_loss, per_sample_mse


def test_per_sample_mse_averages_over_c_h_w_in_fp32():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.zeros(2, 4, 2, 2)
    target[0, 0, 0, 0] = 4.0  # one element of 16 differs by 4: (16)/16 = 1
    target[1] = 0.5  # all differ by 0.5: 0.25
    err = per_sample_mse(pred.half(), target.half())
    assert err.dtype == torch.float32
    assert err.tolist() == [1.0, 0.25]


def test_loss_matches_hand_computation_and_sign():
    beta = 5000.0
    d = 2.0**-12  # exactly representable in fp32
    # pair 0: the policy lowers its error on the preferred image by d and raises it on the rejected one by 2d
    ref = torch.tensor([0.50, 0.25, 0.75, 0.125])  # (2B,) preferred first: w0, w1, l0, l1
    model = torch.tensor([0.50 - d, 0.25, 0.75 + 2 * d, 0.125])
    loss, m = diffusion_dpo_loss(model, ref, beta)
    chosen0 = -0.5 * beta * (-d)  # = 0.6103515625
    rejected0 = -0.5 * beta * (2 * d)  # = -1.220703125
    u0 = chosen0 - rejected0
    assert m["rewards/chosen"][0].item() == pytest.approx(chosen0, rel=1e-6)
    assert m["rewards/rejected"][0].item() == pytest.approx(rejected0, rel=1e-6)
    assert m["rewards/margins"][0].item() == pytest.approx(u0, rel=1e-6)
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(-u0)), rel=1e-6)
    # pair 1: policy = reference, u = 0, loss = ln 2, and u > 0 is strict: accuracy 0
    assert loss[1].item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["mse/chosen"].tolist() == [0.50 - d, 0.25]
    assert m["ref_mse/rejected"].tolist() == [0.75, 0.125]


def test_wrong_direction_is_penalised():
    ref = torch.tensor([0.5, 0.5])
    better = diffusion_dpo_loss(torch.tensor([0.49, 0.51]), ref, 100.0)[0]
    worse = diffusion_dpo_loss(torch.tensor([0.51, 0.49]), ref, 100.0)[0]
    assert better.item() < math.log(2) < worse.item()


def test_gradient_lowers_preferred_error_and_raises_rejected():
    model = torch.tensor([0.4, 0.4], requires_grad=True)
    loss, _ = diffusion_dpo_loss(model, torch.tensor([0.4, 0.4]), 10.0)
    loss.sum().backward()
    # d loss / d e_w = 0.5·β·σ(-u) > 0 (descent lowers e_w); d loss / d e_l < 0 (descent raises e_l)
    assert model.grad[0].item() == pytest.approx(0.5 * 10.0 * 0.5)
    assert model.grad[1].item() == pytest.approx(-0.5 * 10.0 * 0.5)


def test_reference_is_constant():
    ref = torch.tensor([0.4, 0.4], requires_grad=True)
    loss, _ = diffusion_dpo_loss(torch.tensor([0.3, 0.5]), ref, 10.0)
    assert not loss.requires_grad


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="preferred first"):
        diffusion_dpo_loss(torch.zeros(3), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        per_sample_mse(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 3))


def test_sft_loss_is_the_preferred_error():
    from lora_dpo.losses import sft_loss

    err = torch.tensor([0.25, 0.5])
    loss, m = sft_loss(err)
    assert loss.tolist() == [0.25, 0.5] and m["mse/chosen"].tolist() == [0.25, 0.5]
    with pytest.raises(ValueError):
        sft_loss(torch.zeros(2, 2))

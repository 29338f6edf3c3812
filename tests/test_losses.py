"""The Diffusion-DPO loss against values derived by hand (Wallace et al. 2023, arXiv 2311.12908, Eq. 14)."""

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


# ----------------------------------------------------------------------------------------------------------
# The loss family (issue 7): hand-computed values, zero margin, gradient direction


def _pair(dw: float, dl: float, beta: float):
    """One pair whose policy error moves by dw (preferred) and dl (rejected) from a reference of 0.5 / 0.25."""
    ref = torch.tensor([0.5, 0.25])
    model = torch.tensor([0.5 + dw, 0.25 + dl], requires_grad=True)
    h = -0.5 * (dw - dl)  # the implicit log-ratio
    return model, ref, h


def test_label_smoothing_is_conservative_dpo():
    beta, eps = 100.0, 0.1
    model, ref, h = _pair(-0.01, 0.01, beta)  # u = β·h = 1
    u = beta * h
    loss, m = diffusion_dpo_loss(model, ref, beta, label_smoothing=eps)
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-u))) - eps * math.log(1 / (1 + math.exp(u)))
    assert u == pytest.approx(1.0) and loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(u, rel=1e-6)
    at_zero, _ = diffusion_dpo_loss(torch.tensor([0.5, 0.25]), ref, beta, label_smoothing=eps)
    assert at_zero.item() == pytest.approx(math.log(2), abs=1e-7)
    far, _ = diffusion_dpo_loss(torch.tensor([0.3, 0.45]), ref, beta, label_smoothing=eps)  # u = 20
    assert far.item() == pytest.approx(0.9 * math.log1p(math.exp(-20)) + 0.1 * math.log1p(math.exp(20)), rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        diffusion_dpo_loss(model, ref, beta, "hinge", label_smoothing=eps)


def test_ipo_pulls_the_log_ratio_to_its_target():
    beta = 50.0
    target = 1 / (2 * beta)  # h* = 0.01
    model, ref, h = _pair(-0.004, 0.002, beta)  # h = 0.003
    loss, m = diffusion_dpo_loss(model, ref, beta, "ipo")
    assert loss.item() == pytest.approx((h - target) ** 2, rel=1e-5)
    loss.sum().backward()
    # d/de_w = 2(h - h*)·(-0.5) > 0 below the target: descent lowers e_w; d/de_l the opposite
    assert model.grad[0].item() == pytest.approx(-(h - target), rel=1e-4) and model.grad[1].item() < 0
    zero, _ = diffusion_dpo_loss(torch.tensor([0.5, 0.25]), ref, beta, "ipo")
    assert zero.item() == pytest.approx(target**2, rel=1e-6)
    beyond = torch.tensor([0.5 - 0.03, 0.25], requires_grad=True)  # h = 0.015 > h*: pulled back
    diffusion_dpo_loss(beyond, ref, beta, "ipo")[0].sum().backward()
    assert beyond.grad[0].item() < 0  # descent now raises e_w: IPO does not push the margin without bound


def test_hinge_stops_at_margin_one():
    beta = 100.0
    model, ref, h = _pair(-0.002, 0.002, beta)  # u = 0.2
    loss, _ = diffusion_dpo_loss(model, ref, beta, "hinge")
    assert loss.item() == pytest.approx(1 - beta * h, rel=1e-5)
    loss.sum().backward()
    assert model.grad[0].item() == pytest.approx(0.5 * beta) and model.grad[1].item() == pytest.approx(-0.5 * beta)
    done = torch.tensor([0.5 - 0.02, 0.25 + 0.01], requires_grad=True)  # u = 1.5 ≥ 1: no loss, no gradient
    loss, _ = diffusion_dpo_loss(done, ref, beta, "hinge")
    loss.sum().backward()
    assert loss.item() == 0 and done.grad.abs().max().item() == 0
    assert diffusion_dpo_loss(torch.tensor([0.5, 0.25]), ref, beta, "hinge")[0].item() == 1.0


def test_mapo_matches_the_paper_and_needs_no_reference():
    from lora_dpo.losses import mapo_loss

    e = torch.tensor([0.5, 0.501], requires_grad=True)  # preferred, rejected: a margin of about 0.2
    loss, m = mapo_loss(e, beta=0.1, alpha=0.5, num_train_timesteps=1000)
    f = lambda x: 0.5 * x / math.expm1(0.5 * x)  # noqa: E731
    margin = 1000 * (f(0.5) - f(0.501))
    assert f(0.5) == pytest.approx(0.8802, abs=1e-4)
    assert m["rewards/margins"].item() == pytest.approx(margin, rel=1e-5) and m["rewards/accuracies"].item() == 1.0
    assert 0.1 < margin < 0.5
    assert loss.item() == pytest.approx(0.5 - 0.1 * math.log(1 / (1 + math.exp(-margin))), rel=1e-5)
    loss.sum().backward()
    assert e.grad[0].item() > 1 and e.grad[1].item() < 0  # lowers the preferred error, raises the rejected one
    same, m0 = mapo_loss(torch.tensor([0.3, 0.3]))  # zero margin: e_w + β·ln 2
    assert same.item() == pytest.approx(0.3 + 0.1 * math.log(2), rel=1e-6) and m0["rewards/accuracies"].item() == 0
    exact, _ = mapo_loss(torch.tensor([0.0, 0.0]))  # f(0) = 1, its limit: no 0/0
    assert torch.isfinite(exact).all()


def test_kto_scores_each_image_against_the_reference_point():
    from lora_dpo.losses import kto_loss, kto_reference_point

    model = torch.tensor([0.40, 0.60, 0.50], requires_grad=True)
    ref = torch.tensor([0.50, 0.50, 0.50])  # g = e_ref - e_θ = 0.1, -0.1, 0
    desirable = torch.tensor([True, False, True])
    z = kto_reference_point(model, ref)
    assert z.item() == 0  # mean g = 0, clamped at 0
    assert kto_reference_point(torch.tensor([0.4]), torch.tensor([0.5])).item() == pytest.approx(0.1)
    assert kto_reference_point(torch.tensor([0.6]), torch.tensor([0.5])).item() == 0
    beta = 10.0
    loss, m = kto_loss(model, ref, desirable, beta, z, desirable_weight=1.0, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.tolist() == pytest.approx([1 - sig(1.0), 2 * (1 - sig(1.0)), 0.5], rel=1e-5)
    assert m["rewards/chosen:sum"].item() == pytest.approx(1.0) and m["rewards/chosen:count"].item() == 2
    assert m["rewards/rejected:sum"].item() == pytest.approx(-1.0) and m["rewards/rejected:count"].item() == 1
    assert m["mse/chosen:sum"].item() == pytest.approx(0.9) and m["kl"].tolist() == [0.0, 0.0, 0.0]
    loss.sum().backward()
    # desirable images: descent lowers their error; the undesirable one: descent raises it
    assert model.grad[0].item() > 0 and model.grad[2].item() > 0 and model.grad[1].item() < 0


def test_kto_measures_each_reward_from_a_positive_reference_point():
    from lora_dpo.losses import kto_loss, kto_reference_point

    model = torch.tensor([0.4, 0.6, 0.2])
    ref = torch.tensor([0.5, 0.5, 0.5])  # g = 0.1, -0.1, 0.3: mean 0.1
    z = kto_reference_point(model, ref)
    assert z.item() == pytest.approx(0.1)
    # a reduce over processes replaces the local mean (here: as if the other process's mean were 0.3)
    assert kto_reference_point(model, ref, reduce=lambda t: (t + 0.3) / 2).item() == pytest.approx(0.2)
    loss, m = kto_loss(model, ref, torch.tensor([True, False, False]), 10.0, z)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # at g = z the utility is σ(0) whatever the label; an undesirable image above z loses more than one below it
    assert loss.tolist() == pytest.approx([0.5, 1 - sig(2.0), sig(2.0)], rel=1e-5)
    assert m["kl"].tolist() == pytest.approx([0.1] * 3)
    assert m["rewards/rejected:sum"].item() == pytest.approx(2.0) and m["rewards/rejected:count"].item() == 2


def test_sdpo_scale_keeps_the_preferred_error_from_rising():
    from lora_dpo.losses import sdpo_loser_scale

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 3, 3, generator=g)
    target[1] = target[0]  # the pair shares its noise
    diff_w = torch.randn(1, 4, 3, 3, generator=g)
    diff_l = diff_w + 0.5 * torch.randn(1, 4, 3, 3, generator=g)  # aligned with the winner's error: g_A·g_B > 0
    pred = target + torch.cat([diff_w, diff_l])
    mu = 0.6
    lam = sdpo_loser_scale(pred, target, mu)
    n = diff_w.numel()
    grad_a, grad_b = 2 * diff_w.flatten() / n, 2 * diff_l.flatten() / n
    expected = min(1.0, (1 - mu) * grad_a.pow(2).sum().item() / grad_a.dot(grad_b).item())
    assert 0 < lam.item() < 1 and lam.item() == pytest.approx(expected, rel=1e-5)
    # the safeguard's inequality: the step -∇A + λ∇B lowers A by at least μ‖∇A‖² to first order
    step = -grad_a + lam * grad_b
    assert step.dot(grad_a).item() <= -mu * grad_a.pow(2).sum().item() * (1 - 1e-5)
    opposed = torch.cat([target[:1] + diff_w, target[1:] - diff_w])  # g_A·g_B < 0: nothing to guard, λ = 1
    assert sdpo_loser_scale(opposed, target, mu).item() == 1.0
    # applied straight-through: the loss value is unchanged, the rejected error's gradient is scaled by λ
    errs = torch.tensor([0.4, 0.6], requires_grad=True)
    plain, _ = diffusion_dpo_loss(errs, torch.tensor([0.5, 0.5]), 10.0)
    plain.sum().backward()
    grad_plain = errs.grad.clone()
    errs.grad = None
    guarded, _ = diffusion_dpo_loss(errs, torch.tensor([0.5, 0.5]), 10.0, loser_scale=lam)
    guarded.sum().backward()
    assert guarded.item() == plain.item() and errs.grad[0].item() == pytest.approx(grad_plain[0].item())
    assert errs.grad[1].item() == pytest.approx(lam.item() * grad_plain[1].item(), rel=1e-6)

"""The rectified-flow pieces the SD3 / FLUX families will share, checked against diffusers' own training utilities and
flow scheduler: the σ densities, the static and dynamic shifts, the noising and the velocity target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from lora_dpo.models.families.flow_matching import (
    SIGMA_SCHEMES,
    dynamic_shift_mu,
    flow_noised,
    flow_velocity,
    image_seq_len,
    sample_density,
    scheduler_shift,
    shift_sigmas,
)

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("scheme", SIGMA_SCHEMES)
def test_densities_draw_what_diffusers_training_scripts_draw(scheme):
    ours = sample_density(scheme, 4096, torch.Generator().manual_seed(3))
    theirs = compute_density_for_timestep_sampling(scheme, 4096, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs)
    assert ours.dtype == torch.float32 and bool(((ours > 0) & (ours < 1)).all())
    if scheme == "logit_normal":  # the median of sigmoid(N(0, 1)) is 1/2
        assert abs(ours.median().item() - 0.5) < 4 / np.sqrt(4096)
    with pytest.raises(ValueError, match="logit_normal"):
        sample_density("cosmap", 2)


def test_static_shift_is_the_schedulers_own():
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas
    ours = shift_sigmas(plain, 3.0)
    # the same float32 formula, maybe in another order: a few ulps of values <= 1
    assert torch.allclose(ours, shifted, rtol=0, atol=4 * EPS32)
    assert torch.equal(shift_sigmas(plain, 1.0), plain)
    assert bool((ours >= plain).all())  # a shift > 1 moves every σ towards noise


def test_dynamic_shift_is_what_the_flux_pipeline_samples_with():
    config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 4096, "shift": 3.0}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    tokens = image_seq_len((16, 128, 128))  # a 1024 px FLUX image: 64 × 64 packed tokens
    assert tokens == 4096 and dynamic_shift_mu(tokens, config) == pytest.approx(1.15)
    sigmas = np.linspace(1.0, 1 / 28, 28)
    scheduler.set_timesteps(sigmas=sigmas, mu=dynamic_shift_mu(tokens, config))
    ours = scheduler_shift(torch.tensor(sigmas, dtype=torch.float64), config, tokens)
    assert torch.allclose(ours, scheduler.sigmas[:-1].double(), rtol=0, atol=4 * EPS32)  # theirs is stored in fp32
    static = scheduler_shift(torch.tensor(sigmas), {"shift": 3.0}, tokens)
    assert torch.allclose(static, shift_sigmas(torch.tensor(sigmas), 3.0))
    with pytest.raises(NotImplementedError):
        scheduler_shift(torch.tensor(sigmas), {**config, "time_shift_type": "linear"}, tokens)


def test_noising_is_the_schedulers_and_the_velocity_leads_back_to_x0():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    index = torch.tensor([0, 400, 999])
    sigmas, timesteps = scheduler.sigmas[index], scheduler.timesteps[index]
    ours = flow_noised(x0, eps, sigmas)
    theirs = torch.stack([scheduler.scale_noise(x0[i:i + 1], timesteps[i:i + 1], eps[i:i + 1])[0] for i in range(3)])
    assert torch.equal(ours, theirs)
    v = flow_velocity(x0, eps)
    back = ours - sigmas.reshape(-1, 1, 1, 1) * v  # x_0 = x_t − σ·v, up to rounding of values of size ~|x0| + |eps|
    bound = 4 * EPS32 * (x0.abs() + eps.abs()).max()
    assert (back - x0).abs().max() <= bound
    assert torch.equal(flow_noised(x0, eps, torch.ones(3)), eps) and torch.equal(flow_noised(x0, eps, torch.zeros(3)), x0)

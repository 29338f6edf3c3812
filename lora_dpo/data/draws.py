"""The random draws of a training step, keyed by the pair they belong to rather than by the process that sees it.

Every random number a Diffusion-DPO step needs belongs to one pair (Wallace et al. 2023, arXiv 2311.12908, Eq. 14,
where both images of a pair are noised with the same ε at the same t): the VAE posterior sample ``ε_z`` of each of its two images, and one noise ``ε`` and one
timestep ``t`` shared by both. They all come from one CPU ``torch.Generator`` seeded with :func:`draw_seed` of
``(salt, seed, epoch, index)``, so:

- the global batch of a step gets the same draws whether 1 process holds it or N processes hold a share each:
  a 2-process run and a 1-process run with the same global batch train the same adapter (issue 6, tested);
- pairs on different processes get different draws (every rank drawing the same noise is a known pitfall);
- a resumed run draws what the uninterrupted run would have drawn, with no generator state in the checkpoint;
- the same pair draws anew in each epoch;
- the precomputed reference (:mod:`lora_dpo.data.cache`) keys draw ``k`` of a pair the same way, and training on that
  draw reuses the seed, so its stored reference errors belong to exactly the latents, noise and timestep trained on.

Draw order inside one pair's generator, all float32 on the CPU: ``ε_z`` ``(2, C, h, w)`` (preferred, rejected), then
``ε`` ``(1, C, h, w)``, then ``t`` ``(1,)`` in ``[0, num_train_timesteps)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

TRAIN_SALT = 0x7D1A  # training draws: (seed, epoch, index)
REFERENCE_SALT = 0x2EF5  # precomputed reference: (seed, index, draw k)
EVAL_SALT = 0x4C03  # implicit-reward evaluation: (seed, index, draw k)


def draw_seed(salt: int, seed: int, *key: int) -> int:
    """A 64-bit generator seed for ``(salt, seed, *key)`` (numpy ``SeedSequence``: well mixed, no collisions between
    nearby keys). ``key`` is e.g. ``(epoch, index)`` for training or ``(index, k)`` for a reference draw."""
    return int(np.random.SeedSequence([salt, seed % 2**64, *key]).generate_state(1, np.uint64)[0])


def pair_draws(seeds: Sequence[int], latent_shape: Sequence[int], num_train_timesteps: int, device=None,
               sample_timesteps: Callable[[torch.Generator], torch.Tensor] | None = None):
    """The draws of ``B`` pairs, one generator per pair, in the batch layout of :class:`lora_dpo.data.pairs.PairBatch`.

    Args:
        seeds: ``B`` seeds from :func:`draw_seed`, in batch order.
        latent_shape: ``(C, h, w)`` of one image's latent.
        device: where the results go (drawn on the CPU, so they do not depend on the device).
        sample_timesteps: the model family's timestep draw, ``(1,)`` from a pair's generator
            (:func:`lora_dpo.models.loading.timestep_sampler`); None draws ``t ~ U{0..num_train_timesteps-1}``,
            which is SD1.5's and SDXL's.
    Returns:
        ``eps_z (2B, C, h, w)`` (all preferred rows, then all rejected), ``noise (B, C, h, w)``, ``timesteps (B,)``
        (long for the uniform integer draw); float tensors are float32.
    """
    eps, noise, timesteps = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        eps.append(torch.randn((2, *latent_shape), generator=g))
        noise.append(torch.randn((1, *latent_shape), generator=g))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g) if sample_timesteps is None
                         else sample_timesteps(g))
    eps_z = torch.cat([torch.stack([e[0] for e in eps]), torch.stack([e[1] for e in eps])])
    return eps_z.to(device), torch.cat(noise).to(device), torch.cat(timesteps).to(device)


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scale: float) -> torch.Tensor:
    """``z = (mean + std·ε)·scaling_factor``: diffusers' ``latent_dist.sample()`` (in the posterior's dtype) with a
    given ``ε``, then scaled as the UNet sees it. Shapes ``(N, C, h, w)``; returns float32."""
    return (mean + std * eps.to(mean.device, mean.dtype)).float() * scale

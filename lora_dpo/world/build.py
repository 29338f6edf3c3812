"""The digits world: a small but real text-to-image model and its AI feedback, built on a CPU.

It mirrors the paper's "learning from AI feedback" experiment (Wallace et al. 2023, §5.3) at a size a 2-core CPU
can run, so that alignment can be measured, not only run:

- **base model**: a pipeline in the standard SD1.5 layout (``AutoencoderKL``, CLIP text encoder and tokenizer,
  ``UNet2DConditionModel``, scheduler), trained here on the 1,797 real handwritten digits of
  ``sklearn.datasets.load_digits`` upscaled to 32 px, with captions such as ``a handwritten digit seven``. It is
  trained just long enough to draw recognisable but imperfect digits, which leaves room for alignment;
- **scorer**: a digit classifier trained on real digits (:class:`lora_dpo.feedback.scorers.DigitClassifierScorer`);
  the reward is the probability of the prompted digit;
- **preference sets**: pairs of the base model's samples for the same prompt, labelled by the scorer
  (:func:`lora_dpo.feedback.prefs.build_preference_set`), a training split and a held-out split with disjoint seeds.

A world folder (default ``worlds/digits/``, committed to the repository so the demo needs no build)::

    pipeline/    StableDiffusionPipeline.from_pretrained opens it
    scorer/      classifier.safetensors + classifier.json
    prefs/       train.parquet, heldout.parquet (Pick-a-Pic schema, PNG images)
    world.json   settings, costs, sizes, and how well the base model does

:func:`build_digits_world` is the build both worlds share (scorer, VAE, denoiser stage, measurement, preference
sets, world.json); the SD3-layout world (:mod:`lora_dpo.world.flow`) gives it its own denoiser stage.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from sklearn.datasets import load_digits
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from lora_dpo.feedback.prefs import build_preference_set
from lora_dpo.feedback.prompts import digit_caption
from lora_dpo.feedback.scorers import DigitClassifierScorer, digits_to_images
from lora_dpo.inference.sampling import generate_images
from lora_dpo.models.tiny import build_tokenizer, text_config

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[2]
WORLD_DIR = REPO_DIR / "worlds" / "digits"
TRAIN_SEED_OFFSET = 0  # training pairs use seeds [0, 2·pairs_per_prompt)
HELDOUT_SEED_OFFSET = 100_000  # held-out pairs; lora-dpo eval samples from seed 10_000 on, disjoint from both
BASE_EVAL_SEED_OFFSET = 50_000  # the build's own measurement of the base model's samples


@dataclass
class CommonWorldConfig:
    """What every digits world shares: the data, the VAE, the measurement of the base model, the preference sets.
    :class:`WorldConfig` (SD1.5 layout) and :class:`lora_dpo.world.flow.FlowWorldConfig` (SD3 layout) add their
    denoiser's settings."""

    seed: int = 0
    resolution: int = 32
    # VAE: 32 px RGB -> 4 x 8 x 8 latents (three blocks, downsampling by 4).
    vae_steps: int = 300
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    # SD3 layout: centre the latents with a shift factor, z = (x - shift)·scale; SD1.5 layout: z = x·scale.
    vae_shift: bool = False
    # A pipeline folder (relative: to the repository) whose VAE this world takes instead of training one.
    vae_from: str | None = None
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    # Measuring the base model while it trains and at the end (classifier accuracy on its samples).
    eval_every: int = 500
    eval_seeds_per_prompt: int = 10
    final_eval_seeds_per_prompt: int = 40
    sample_steps: int = 20
    guidance_scale: float = 3.0
    # Preference sets (AI feedback): pairs per prompt, 10 prompts.
    train_pairs_per_prompt: int = 100
    heldout_pairs_per_prompt: int = 20
    stage_times_s: dict[str, float] = field(default_factory=dict)


@dataclass
class WorldConfig(CommonWorldConfig):
    """The digits world (SD1.5 layout); the defaults reproduce the committed ``worlds/digits``."""

    # UNet: epsilon prediction on the latents, 10% empty captions for classifier-free guidance.
    unet_block_out_channels: tuple[int, int] = (32, 64)
    unet_steps: int = 1000  # samples are ~10% correct at 750 steps, ~54% at 1000, ~95% at 1250 (see README)
    unet_batch_size: int = 128
    unet_lr: float = 1e-3
    unet_warmup_steps: int = 100


def digit_dataset(resolution: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """The 1,797 sklearn digits as images ``(N, 3, R, R)`` float32 in [-1, 1] (white ink on black) and labels ``(N,)``."""
    digits = load_digits()
    images = digits_to_images(digits.images, size=resolution)
    array = np.stack([np.asarray(im) for im in images])  # (N, R, R, 3) uint8
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0, digits.target.astype(np.int64)


def train_vae(images: torch.Tensor, cfg: CommonWorldConfig):
    """Train a small ``AutoencoderKL`` (reconstruction MSE + ``vae_kl_weight``·KL) on ``images`` ``(N, 3, R, R)`` in
    [-1, 1], then set its latent factors (:func:`fit_latent_factors`). Returns ``(vae, report)``."""
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=cfg.resolution,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.vae_steps), desc="vae", unit="step"):
        batch = images[torch.randint(0, len(images), (cfg.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return fit_latent_factors(vae, images, cfg.vae_shift)


def load_vae(images: torch.Tensor, cfg: CommonWorldConfig):
    """The VAE of the pipeline folder ``cfg.vae_from`` (relative paths: to the repository), its latent factors set
    again for this world (:func:`fit_latent_factors`). Returns ``(vae, report)``.

    Raises:
        FileNotFoundError: the folder has no ``vae/`` (build that world first).
    """
    folder = Path(cfg.vae_from)
    folder = folder if folder.is_absolute() else REPO_DIR / folder
    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"no VAE in {folder}: this world takes the VAE of {cfg.vae_from}; build that world "
                                "first (`lora-dpo world build`)")
    vae, report = fit_latent_factors(AutoencoderKL.from_pretrained(folder, subfolder="vae"), images, cfg.vae_shift)
    return vae, {**report, "from": cfg.vae_from}


def fit_latent_factors(vae, images: torch.Tensor, shift: bool):
    """Set the VAE's scaling factor so the latents of ``images`` have unit standard deviation, as SD does; with
    ``shift``, first centre them with a shift factor (their mean), as SD3 does: ``z = (x − shift)·scale``.
    Returns ``(vae, report)``: the VAE frozen in eval mode; its size, factors and reconstruction MSE."""
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])
        recon = torch.cat([vae.decode(chunk).sample for chunk in means.split(256)])
    factors = {"shift_factor": means.mean().item()} if shift else {}
    factors["scaling_factor"] = 1.0 / (means - factors.get("shift_factor", 0.0)).std().item()
    vae.register_to_config(**factors)
    report = {"params_m": sum(p.numel() for p in vae.parameters()) / 1e6, **factors,
              "recon_mse": torch.nn.functional.mse_loss(recon, images).item()}
    return vae.requires_grad_(False), report


def _text_embeddings(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _assemble(vae, text_encoder, tokenizer, unet, num_train_timesteps: int = 1000):
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=num_train_timesteps,
        prediction_type="epsilon", steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sample_accuracy(pipe, scorer, seeds_per_prompt: int, cfg: CommonWorldConfig,
                    seed_offset: int = BASE_EVAL_SEED_OFFSET) -> float:
    """Fraction of the pipeline's samples (10 digit prompts × seeds) that the classifier reads as the prompted digit."""
    prompts = [digit_caption(d) for d in range(10) for _ in range(seeds_per_prompt)]
    seeds = [seed_offset + i % seeds_per_prompt for i in range(len(prompts))]
    images = generate_images(pipe, prompts, seeds, num_inference_steps=cfg.sample_steps,
                             guidance_scale=cfg.guidance_scale, batch_size=200)
    return float(np.mean(scorer.predict(images) == np.repeat(np.arange(10), seeds_per_prompt)))


def train_denoiser(model: torch.nn.Module, loss_fn, latent_mean: torch.Tensor, latent_std: torch.Tensor,
                   labels, cfg: CommonWorldConfig, *, steps: int, batch_size: int, lr: float, warmup_steps: int,
                   desc: str, evaluate=None) -> dict:
    """The worlds' base-model training loop: AdamW (weight decay 0.01), constant learning rate after a linear
    warm-up, gradients clipped at norm 1, ``cfg.caption_dropout`` of the captions replaced by the empty one.

    Each step draws ``batch_size`` digits, a latent from each one's VAE posterior and the dropped captions from
    one generator (seed ``cfg.seed + 1``), then ``loss_fn(model, z, caption_index, generator)`` draws the noise
    and returns the denoising loss.

    Args:
        latent_mean, latent_std: ``(N, C, h, w)`` VAE posterior in the denoiser's latent space (shifted and
            scaled). ``labels``: ``(N,)`` digits; caption index 10 is the empty caption.
        evaluate: optional ``callable(model) -> float`` run every ``cfg.eval_every`` steps and at the end
            (classifier accuracy of the samples), the model in eval mode.
    Returns:
        The report: parameters (millions), the loss curve (mean per 100 steps), the accuracies seen.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    # Constant after warm-up: the model after k steps is the same whatever `steps` is, so the accuracy curve
    # recorded during a long build tells which step count gives which base model.
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    labels_t = torch.as_tensor(labels)
    losses, curve, accuracies = [], [], {}
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step")
    for step in bar:
        idx = torch.randint(0, len(labels_t), (batch_size,), generator=generator)
        z = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        drop = torch.rand(len(idx), generator=generator) < cfg.caption_dropout
        loss = loss_fn(model, z, torch.where(drop, torch.full_like(idx, 10), labels_t[idx]), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            curve.append(round(float(np.mean(losses[-100:])), 5))
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
        if evaluate is not None and (step % cfg.eval_every == 0 or step == steps):
            model.eval()
            accuracies[step] = evaluate(model)
            model.train()
            log.info("step %d: classifier accuracy on samples %.3f", step, accuracies[step])
    model.eval().requires_grad_(False)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "loss_per_100_steps": curve,
            "sample_accuracy_during_training": accuracies}


def train_unet(latent_mean, latent_std, labels, text_embeds, cfg: WorldConfig, evaluate=None):
    """Train the UNet with the standard denoising objective (epsilon prediction, DDPM noise schedule of SD1.5) in
    :func:`train_denoiser`'s loop.

    Args:
        latent_mean, latent_std: ``(N, 4, 8, 8)`` VAE posterior, already multiplied by the scaling factor.
        labels: ``(N,)`` digits; ``text_embeds``: ``(11, L, D)``, the ten captions then the empty caption.
        evaluate: optional ``callable(unet) -> float`` run every ``eval_every`` steps (classifier accuracy).
    Returns:
        ``(unet, report)`` with the loss curve (mean per 100 steps) and the accuracies seen during training.
    """
    torch.manual_seed(cfg.seed)
    c1, c2 = cfg.unet_block_out_channels
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(c1, c2), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_embeds.shape[-1],
        attention_head_dim=8, norm_num_groups=32,
    )
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)

    def epsilon_loss(model, z, caption, generator):
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, 1000, (len(z),), generator=generator)
        pred = model(noise_scheduler.add_noise(z, noise, t), t, text_embeds[caption]).sample
        return torch.nn.functional.mse_loss(pred, noise)

    report = train_denoiser(unet, epsilon_loss, latent_mean, latent_std, labels, cfg, steps=cfg.unet_steps,
                            batch_size=cfg.unet_batch_size, lr=cfg.unet_lr, warmup_steps=cfg.unet_warmup_steps,
                            desc="unet", evaluate=evaluate)
    return unet, report


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _lap(times: dict[str, float], name: str, t0: float) -> None:
    """Record the seconds since ``t0`` (one decimal) as stage ``name``."""
    times[name] = round(time.perf_counter() - t0, 1)


def _text_encoder(cfg: WorldConfig):
    """A freshly initialised (seed ``cfg.seed``) frozen CLIP text encoder and its tokenizer, as in SD the text
    encoder is not trained. Returns ``(tokenizer, text_encoder, text_embeds)``; ``text_embeds`` ``(11, L, D)``:
    the ten digit captions, then the empty caption."""
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(text_config(len(tokenizer))).eval().requires_grad_(False)  # frozen, as in SD
    captions = [digit_caption(d) for d in range(10)] + [""]
    return tokenizer, text_encoder, _text_embeddings(tokenizer, text_encoder, captions)


def latent_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of ``images`` ``(N, 3, R, R)`` in the denoiser's latent space: ``((mean − shift)·scale,
    std·scale)``, each ``(N, 4, R/4, R/4)`` (``shift`` 0 for a VAE without a shift factor, as SD1.5's)."""
    with torch.no_grad():
        posterior = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    return ((torch.cat([p.mean for p in posterior]) - shift) * scale,
            torch.cat([p.std for p in posterior]) * scale)


def _preference_sets(pipe, scorer, folder: Path, cfg: CommonWorldConfig) -> dict[str, dict]:
    """The training and held-out preference sets (disjoint seeds) as ``folder/prefs/{train,heldout}.parquet``;
    returns their reports, ``out`` relative to the world folder."""
    reports = {}
    prompts = [digit_caption(d) for d in range(10)]
    for split, pairs, offset in (("train", cfg.train_pairs_per_prompt, TRAIN_SEED_OFFSET),
                                 ("heldout", cfg.heldout_pairs_per_prompt, HELDOUT_SEED_OFFSET)):
        reports[split] = build_preference_set(
            pipe, scorer, prompts, pairs, folder / "prefs" / f"{split}.parquet", seed_offset=offset,
            num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, batch_size=200,
        )
        reports[split]["out"] = f"prefs/{split}.parquet"  # relative to the world folder
    return reports


def _move_into_place(tmp: Path, out: Path, report: dict) -> None:
    """Add the folders' sizes to ``report``, write it as ``world.json`` and replace ``out`` by ``tmp``."""
    report["size_mb"] = {p.name: round(_folder_mb(p), 2) for p in tmp.iterdir() if p.is_dir()}
    (tmp / "world.json").write_text(json.dumps(report, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _unet_stage(cfg: WorldConfig, vae, images: torch.Tensor, labels: np.ndarray, scorer):
    """The SD1.5-layout world's denoiser: a frozen CLIP text encoder, the UNet trained on ``images``' latents.
    Returns ``(pipeline, "unet", report)``."""
    tokenizer, text_encoder, text_embeds = _text_encoder(cfg)
    latent_mean, latent_std = latent_posterior(vae, images)

    def evaluate(unet) -> float:
        return sample_accuracy(_assemble(vae, text_encoder, tokenizer, unet), scorer, cfg.eval_seeds_per_prompt, cfg)

    unet, report = train_unet(latent_mean, latent_std, labels, text_embeds, cfg, evaluate)
    return _assemble(vae, text_encoder, tokenizer, unet), "unet", report


def build_world(out_dir: str | Path = WORLD_DIR, cfg: WorldConfig | None = None, *, with_prefs: bool = True) -> dict:
    """Build the whole digits world into ``out_dir`` (replaced): scorer, VAE, UNet, pipeline, preference sets,
    world.json.

    Cost on a 2-core CPU with the defaults: see ``world.json`` (``stage_times_s``) and the README.
    """
    return build_digits_world(out_dir, cfg or WorldConfig(), _unet_stage, with_prefs=with_prefs)


def build_digits_world(out_dir: str | Path, cfg: CommonWorldConfig, denoiser_stage, *, with_prefs: bool = True) -> dict:
    """Build a digits world into ``out_dir`` (replaced once the build succeeded; it is assembled in
    ``<out_dir>.building``): the scorer, the VAE, the denoiser (``denoiser_stage(cfg, vae, images, labels, scorer)
    -> (pipeline, name, report)``), ``pipeline/``, the base model's accuracy, the preference sets and
    ``world.json`` (settings, each stage's seconds, the reports, the folders' sizes). Returns the report."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    times: dict[str, float] = {}
    started = t0 = time.perf_counter()
    scorer, scorer_report = DigitClassifierScorer.train(seed=cfg.seed)
    scorer.save(tmp / "scorer")
    _lap(times, "scorer", t0)

    images, labels = digit_dataset(cfg.resolution)
    t0 = time.perf_counter()
    vae, vae_report = load_vae(images, cfg) if cfg.vae_from else train_vae(images, cfg)
    _lap(times, "vae", t0)

    t0 = time.perf_counter()
    pipe, denoiser_name, denoiser_report = denoiser_stage(cfg, vae, images, labels, scorer)
    _lap(times, denoiser_name, t0)
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    t0 = time.perf_counter()
    final_accuracy = sample_accuracy(pipe, scorer, cfg.final_eval_seeds_per_prompt, cfg)
    _lap(times, "final_eval", t0)

    prefs_report = {}
    if with_prefs:
        t0 = time.perf_counter()
        prefs_report = _preference_sets(pipe, scorer, tmp, cfg)
        _lap(times, "prefs", t0)
    times["total"] = round(time.perf_counter() - started, 1)
    cfg.stage_times_s = times
    report: dict[str, Any] = {
        "config": asdict(cfg), "torch_threads": torch.get_num_threads(), "scorer": scorer_report, "vae": vae_report,
        denoiser_name: denoiser_report, "base_sample_accuracy": final_accuracy,
        "base_sample_accuracy_settings": {"seeds_per_prompt": cfg.final_eval_seeds_per_prompt, "seed_offset": BASE_EVAL_SEED_OFFSET,
                                          "steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale},
        "prefs": prefs_report,
    }
    _move_into_place(tmp, out, report)
    log.info("world built in %s: base accuracy %.3f, %s", out, final_accuracy, times)
    return report

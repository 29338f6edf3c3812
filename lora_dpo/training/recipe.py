"""The Diffusion-DPO recipe: setup in a commented order, then one explicit loop, top to bottom.

Policy and reference come from :mod:`lora_dpo.models.policy`: base UNet + trainable LoRA against the same UNet with the
adapter disabled (``train.mode: lora``), or the whole UNet against a frozen copy (``train.mode: full``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_dpo.config import ConfigError, LossConfig, RecipeConfig
from lora_dpo.data.cache import CachedBatch, CachedPairs, check_cache
from lora_dpo.data.draws import pair_draws, posterior_sample
from lora_dpo.data.loader import build_dataloader
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.data.streaming import StreamingPairs, merge_reports
from lora_dpo.data.unpaired import ImageBatch, LabeledImages
from lora_dpo.errors import TrainingDiverged
from lora_dpo.export.artifacts import write_model_card
from lora_dpo.models.loading import (
    DTYPES,
    Components,
    encode_posterior,
    encode_prompts,
    load_components,
    read_model_index,
    training_target,
    unet_conditioning,
)
from lora_dpo.models.lora_files import check_adapter_fits_model
from lora_dpo.models.policy import Policy, build_policy, run_reference_lora
from lora_dpo.training import checkpoint as ckpt
from lora_dpo.training.diagnostics import BothErrorsRising, ratio_means, timestep_bucket_sums
from lora_dpo.training.losses import (
    diffusion_dpo_loss,
    kto_loss,
    kto_reference_point,
    mapo_loss,
    per_sample_mse,
    sdpo_loser_scale,
    sft_loss,
)
from lora_dpo.training.optim import build_lr_scheduler, build_optimizer, check_optimizer_available

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"



@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    interrupted: str | None = None  # "SIGINT"/"SIGTERM" when stopped by a signal (a checkpoint was saved)
    # The export: the adapter file (LoRA mode) or the pipeline's model_index.json (full mode); None if interrupted.
    adapter_path: Path | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained UNet (adapter attached in LoRA mode)
    policy: Policy | None = field(default=None, repr=False)  # the policy and its reference, as trained
    is_main_process: bool = True


# ----------------------------------------------------------------------------------------------------------
# Helpers the loop calls


class PairStream:
    """Endless micro-batches of pairs (or labeled images) for one process, epoch after epoch, with a resumable position.

    The position is ``(epoch, batch_in_epoch)``: how many micro-batches of the current epoch were consumed.
    Rows whose images fail to decode are dropped from their batch and counted (``skipped``); an all-bad batch
    is skipped whole.
    """

    def __init__(self, dataset, data_cfg, batch_size: int, seed: int, num_replicas: int, rank: int,
                 epoch: int = 0, batch_in_epoch: int = 0):
        self.dataset, self.data_cfg, self.batch_size, self.seed = dataset, data_cfg, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.skipped: dict[str, int] = {}
        self._iter = None

    def _open(self):
        loader = build_dataloader(
            self.dataset, self.data_cfg, self.batch_size, self.seed, num_replicas=self.num_replicas,
            rank=self.rank, epoch=self.epoch, start_batch=self.batch_in_epoch,
        )
        self._iter = iter(loader)

    def next(self):
        while True:
            if self._iter is None:
                self._open()
            batch = next(self._iter, None)
            if batch is None:  # epoch exhausted
                self.epoch, self.batch_in_epoch, self._iter = self.epoch + 1, 0, None
                continue
            self.batch_in_epoch += 1
            for reason, n in (batch.skipped or {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            if len(batch) > 0:
                return batch

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "skipped_in_training": self.skipped}


class StreamedPairStream:
    """:class:`PairStream`'s interface over a streamed data set (``data.streaming``, :class:`StreamingPairs`):
    this process's share, read once per epoch without being stored, with a resumable position."""

    def __init__(self, data_cfg, batch_size: int, seed: int, num_replicas: int, rank: int, data_state: dict):
        self.pairs = StreamingPairs(data_cfg, seed=seed, num_replicas=num_replicas, rank=rank)
        if "stream" in data_state:
            self.pairs.load_state_dict(data_state["stream"])
        self.skipped: dict[str, int] = dict(data_state.get("skipped_in_training", {}))
        self._batches = self.pairs.batches(batch_size)

    def next(self):
        while True:
            batch = next(self._batches)
            for reason, n in (batch.skipped or {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + n
            if len(batch) > 0:
                return batch

    @property
    def epoch(self) -> int:
        return self.pairs.epoch

    def state(self) -> dict[str, Any]:
        return {"epoch": self.pairs.epoch, "batch_in_epoch": None, "stream": self.pairs.state_dict(),
                "skipped_in_training": self.skipped}


def noised_latents(components: Components, mean: torch.Tensor, std: torch.Tensor, draw_seeds: list[int],
                   pairs: bool, weight_dtype: torch.dtype):
    """The UNet's inputs and target for a micro-batch of posteriors, from the keyed draws (:mod:`lora_dpo.data.draws`).

    Args:
        mean, std: the VAE posterior, ``(2B, C, h, w)`` preferred first when ``pairs`` (each pair's images then share
            the pair's noise and timestep, DESIGN.md §1 step 2), else ``(N, C, h, w)`` of N images with one seed each
            (each its own noise and timestep: SFT's preferred images, KTO's labeled images).
        draw_seeds: ``B`` (pairs) or ``N`` seeds; an image of N takes the first posterior sample of its seed's draws.
    Returns:
        ``(noisy latents in weight_dtype, target float32, timesteps long)``, all ``mean.shape[0]`` rows.
    """
    scheduler = components.noise_scheduler
    eps_z, noise, timesteps = pair_draws(draw_seeds, mean.shape[1:], scheduler.config.num_train_timesteps, mean.device)
    latents = posterior_sample(mean, std, eps_z[: mean.shape[0]], components.latent_scale)
    if pairs:
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
    return noisy, training_target(components, latents, noise, timesteps), timesteps


def dpo_micro_step(components: Components, unet, reference: Callable[[], AbstractContextManager[torch.nn.Module]],
                   batch, loss: LossConfig, accelerator, weight_dtype: torch.dtype):
    """Policy (and, for the losses that need it, reference) errors for one micro-batch of ``B`` pairs, and the loss
    per pair (``loss.type``, :mod:`lora_dpo.training.losses`; ``kto`` is :func:`kto_micro_step`).

    One timestep and one noise draw per pair, shared by its two images (DESIGN.md §1 step 2), with the posterior
    samples, all from the pair's keyed seed (``batch.draw_seeds``, :mod:`lora_dpo.data.draws`): a pair gets the same
    draws in any batch, on any process. The reference pass runs first, under ``no_grad`` inside ``reference()``
    (:meth:`lora_dpo.models.policy.Policy.reference`: the adapter disabled, or the frozen copy); the policy pass (with
    grad) follows, so an adapter is enabled again before ``backward()`` re-runs checkpointed segments. A cached
    batch with precomputed reference errors (``batch.ref_mse``, whose seeds are the cached draws') runs no
    reference pass; so do the reference-free losses (``mapo``, ``sft``). ``sft`` runs only the ``B`` preferred images
    through the policy. ``loss.sdpo_mu`` adds the ``sdpo/loser_scale`` metric, ``loss.sft_weight`` the anchor.

    Args:
        unet: the policy as called for training (possibly wrapped by accelerate/DDP).
        reference: a no-argument callable returning a context manager that yields the reference UNet.
        batch: a :class:`lora_dpo.data.pairs.PairBatch` (``2B`` images, preferred first) or a
            :class:`lora_dpo.data.cache.CachedBatch` (their cached posteriors).
    Returns:
        ``(loss (B,), metrics dict of (B,) tensors)`` from :mod:`lora_dpo.training.losses`.
    """
    batch = batch.to(accelerator.device)
    num_pairs = batch.num_pairs
    sft = loss.type == "sft"
    rows = slice(0, num_pairs) if sft else slice(None)  # SFT: the B preferred images only
    cached = isinstance(batch, CachedBatch)
    if cached:
        mean, std = batch.latent_mean[rows], batch.latent_std[rows]
    else:
        mean, std = encode_posterior(components, batch.pixel_values[rows])  # (2B, C, h, w), preferred first
    noisy, target, timesteps = noised_latents(components, mean, std, batch.draw_seeds, not sft, weight_dtype)
    text = batch.text if cached else encode_prompts(components, batch.captions)
    cond = unet_conditioning(components, text, batch, weight_dtype)

    if sft:
        cond = {k: _rows(v, rows) for k, v in cond.items()}
        with accelerator.autocast():
            pred = unet(noisy, timesteps, **cond).sample
        return sft_loss(per_sample_mse(pred, target))
    ref_mse = None
    if loss.needs_reference and cached and batch.ref_mse is not None:
        ref_mse = batch.ref_mse
    elif loss.needs_reference:
        with torch.no_grad(), reference() as ref_unet, accelerator.autocast():
            ref_mse = per_sample_mse(ref_unet(noisy, timesteps, **cond).sample, target)
    with accelerator.autocast():
        pred = unet(noisy, timesteps, **cond).sample
    model_err = per_sample_mse(pred, target)
    if loss.type == "mapo":
        T = components.noise_scheduler.config.num_train_timesteps
        per_pair, metrics = mapo_loss(model_err, loss.mapo_beta, loss.mapo_alpha, T)
    else:
        scale = None if loss.sdpo_mu is None else sdpo_loser_scale(pred, target, loss.sdpo_mu)
        per_pair, metrics = diffusion_dpo_loss(model_err, ref_mse, loss.beta, loss.type, loss.label_smoothing, scale)
        if scale is not None:
            metrics["sdpo/loser_scale"] = scale.expand(num_pairs)
    if loss.sft_weight:  # the SFT anchor on the preferred images
        per_pair = per_pair + loss.sft_weight * model_err[:num_pairs]
    metrics["timestep"] = timesteps[:num_pairs].float()
    return per_pair, metrics


def kto_micro_step(components: Components, unet, reference: Callable[[], AbstractContextManager[torch.nn.Module]],
                   batch: ImageBatch, loss: LossConfig, accelerator, weight_dtype: torch.dtype):
    """Diffusion-KTO (``loss.type: kto``) for one micro-batch of ``N`` labeled images: reference and policy errors,
    the reference point z and the loss per image (:func:`lora_dpo.training.losses.kto_loss`).

    Each image has its own keyed noise, timestep and posterior sample (:func:`noised_latents`, ``pairs=False``). The
    reference pass runs first under ``no_grad`` inside ``reference()``, as in :func:`dpo_micro_step`. z is the mean
    implicit reward of the micro-batch over every process (``accelerator.reduce``: every process calls this step in
    lockstep), clamped at 0. ``loss.sft_weight`` adds ``w·e_θ`` on the desirable images.

    Args:
        batch: an :class:`lora_dpo.data.unpaired.ImageBatch`.
    Returns:
        ``(loss (N,), metrics)``: :func:`lora_dpo.training.losses.kto_loss`'s, plus ``timestep`` ``(N,)``.
    """
    batch = batch.to(accelerator.device)
    mean, std = encode_posterior(components, batch.pixel_values)
    noisy, target, timesteps = noised_latents(components, mean, std, batch.draw_seeds, False, weight_dtype)
    cond = unet_conditioning(components, encode_prompts(components, batch.captions), batch, weight_dtype,
                             images_per_caption=1)
    with torch.no_grad(), reference() as ref_unet, accelerator.autocast():
        ref_mse = per_sample_mse(ref_unet(noisy, timesteps, **cond).sample, target)
    with accelerator.autocast():
        pred = unet(noisy, timesteps, **cond).sample
    model_err = per_sample_mse(pred, target)
    z = kto_reference_point(model_err, ref_mse, reduce=lambda t: accelerator.reduce(t, "mean"))
    per_image, metrics = kto_loss(model_err, ref_mse, batch.desirable, loss.kto_beta, z, loss.desirable_weight,
                                  loss.undesirable_weight)
    if loss.sft_weight:  # the SFT anchor on the desirable images
        per_image = per_image + loss.sft_weight * model_err * batch.desirable
    metrics["timestep"] = timesteps.float()
    return per_image, metrics


def _rows(value, rows: slice):
    """The given batch rows of a conditioning tensor or of a dict of them (SDXL's added_cond_kwargs)."""
    return {k: v[rows] for k, v in value.items()} if isinstance(value, dict) else value[rows]


def setup_policy(cfg: RecipeConfig, device, components: Components | None = None,
                 init_lora: str | Path | None = None, encoders: bool = True,
                 precomputed_reference: bool = False) -> tuple[Components, Policy, torch.dtype]:
    """Load the frozen components in the weight dtype of ``train.mixed_precision`` and build the policy.

    Args:
        components: already built components to use instead of loading ``cfg.model`` (the benchmarks pass
            random-weight real-size ones; in full mode their UNet must be fp32).
        init_lora: the starting LoRA to read instead of ``cfg.lora.init_from`` (the run folder's copy).
        encoders: False loads only the UNet (training from a latent cache).
        precomputed_reference: the reference errors come from the cache: full mode builds no frozen copy.
    Returns:
        ``(components, policy, weight dtype)``: see :func:`lora_dpo.models.policy.build_policy`.
    """
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    if components is None:
        unet_dtype = torch.float32 if cfg.train.mode == "full" else weight_dtype
        components = load_components(cfg.model, weight_dtype, device, unet_dtype=unet_dtype, encoders=encoders)
    policy = build_policy(cfg, components.unet, device, components.family, init_lora, precomputed_reference)
    return components, policy, weight_dtype


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_gb`: CUDA's max-allocated counter, or this process's peak RSS
    (Linux ``/proc/self/clear_refs``; elsewhere the peak keeps counting from the process start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _proc_status_gb(field: str) -> float | None:
    """A memory field of Linux ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in GiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; on the CPU the peak resident set size of this process (``VmHWM``), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = _proc_status_gb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_memory_gb(device: torch.device) -> float:
    """CUDA memory allocated now on a GPU; on the CPU this process's resident set size (``VmRSS``), in GiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    current = _proc_status_gb("VmRSS")
    return current if current is not None else float("nan")


class _StopSignal:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step; a second one aborts."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:  # second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting", self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _prepare_run_dir(cfg: RecipeConfig, run_dir: Path) -> None:
    """Refuse to overwrite an earlier run's checkpoints unless asked (no training state is ever lost silently)."""
    if cfg.train.resume_from is None and ckpt.list_checkpoints(run_dir):
        if not cfg.output.overwrite:
            raise ConfigError(
                f"{run_dir} already holds checkpoints of an earlier run. Continue it with train.resume_from=latest, "
                "pick another output.dir / output.run_name, or pass output.overwrite=true to start over."
            )
        shutil.rmtree(run_dir / ckpt.CHECKPOINTS)
        for name in (METRICS_FILE, "logs"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _check_accumulation(accelerator, cfg: RecipeConfig) -> None:
    """The recipe's gradient accumulation is the one accelerate runs; raises ConfigError when an accelerate or
    DeepSpeed config sets another."""
    if accelerator.gradient_accumulation_steps != cfg.train.gradient_accumulation_steps:
        raise ConfigError(
            f"the accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps} but the "
            f"recipe says train.gradient_accumulation_steps={cfg.train.gradient_accumulation_steps}: set it in the "
            'recipe only (leave it out of the accelerate config, or "auto" in a DeepSpeed config)'
        )


def _check_resume_layout(resume_path: Path, world: int, batch_size: int) -> None:
    """A checkpoint's data position counts micro-batches per process: resuming it needs the same number of processes
    and the same ``train.batch_size``, or pairs would be skipped or seen twice. Raises ConfigError otherwise."""
    state = json.loads((resume_path / "trainer_state.json").read_text())
    saved = state.get("num_processes", 1), state.get("batch_size", batch_size)
    if saved != (world, batch_size):
        raise ConfigError(
            f"{resume_path} was saved by {saved[0]} process(es) with train.batch_size={saved[1]}; this launch has "
            f"{world} with {batch_size}. Resume with the same number of processes and batch size (its data position "
            "counts micro-batches per process), or start a new run"
        )


def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop logged steps later than the checkpoint: they are trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------------------
# The recipe


def train(cfg: RecipeConfig) -> TrainResult:
    """Run LoRA Diffusion-DPO as the recipe says; returns where the adapter went and the final metrics.

    Raises:
        ConfigError / FileNotFoundError / ValueError / ModelLoadError: bad input, before any weight loads.
        TrainingDiverged: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed

    run_dir = cfg.run_dir
    # 1. Cheap checks first, before any weight loads: model folder/id, data set, run folder, resume point.
    read_model_index(cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    check_optimizer_available(cfg.optim)
    manifest = None
    if cfg.data.latent_cache:  # encoded pairs (and maybe reference errors) instead of images: a keyed, checked cache
        manifest = check_cache(cfg, cfg.data.latent_cache)
        dataset = CachedPairs(cfg.data.latent_cache, cfg.data, cfg.train.seed, manifest)
        data_report = {**manifest["data_report"], "latent_cache": cfg.data.latent_cache,
                       "skipped_when_cached": manifest["skipped"]}
    elif cfg.data.streaming:  # read as it goes, never stored: opened per process once the processes are known
        dataset, data_report = None, {"dataset": cfg.data.dataset, "streaming": True}
    else:
        dataset, data_report = load_preference_dataset(cfg.data)
    kto = cfg.loss.type == "kto"
    if kto:  # labeled images: an unpaired set's rows, or each pair's preferred (desirable) and rejected image
        dataset = LabeledImages(dataset, cfg.data, cfg.train.seed)
        data_report = {**data_report, "labeled_images": len(dataset)}
    unit = "images" if kto else "pairs"
    precomputed = bool(manifest and manifest["key"]["reference_draws"]) and cfg.loss.needs_reference
    resume_path = ckpt.resolve_resume(cfg.train.resume_from, run_dir) if cfg.train.resume_from else None
    if resume_path is None and cfg.lora.init_from and cfg.train.mode == "lora":  # safetensors, fits the model
        check_adapter_fits_model(cfg.lora.init_from, cfg.model.pretrained_model_name_or_path, cfg.model.revision)

    # 2. Accelerator: mixed precision and processes. The training draws are keyed by pair (lora_dpo.data.draws), so each
    # process draws its own; the global seed (LoRA dropout) differs per process, the initial weights are rank 0's.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # On a machine without CUDA, accelerate joins a (gloo) process group only when told it runs on the CPU.
    # Gradient accumulation is accelerate's (``accumulate``): it syncs DDP/FSDP gradients on the last micro-batch only
    # and hands DeepSpeed its own accumulation.
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                              cpu=launched > 1 and not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if not accelerator.is_main_process:
        logging.getLogger("lora_dpo").setLevel(logging.WARNING)
    _check_accumulation(accelerator, cfg)
    if resume_path is not None:
        _check_resume_layout(resume_path, world, cfg.train.batch_size)
    if world != launched:
        raise RuntimeError(
            f"launched as {launched} processes but accelerate sees {world}: the processes would train separately "
            "and overwrite each other's run folder; launch with `accelerate launch` or `torchrun`"
        )
    if dataset is not None and len(dataset) < cfg.train.batch_size * world:
        raise ValueError(
            f"{len(dataset)} {unit} remain after filtering, fewer than train.batch_size × processes = "
            f"{cfg.train.batch_size * world}; lower train.batch_size or add data"
        )
    if accelerator.is_main_process:
        _prepare_run_dir(cfg, run_dir)
        (run_dir / "recipe.yaml").write_text(cfg.to_yaml())
        (run_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
    # A run started from a LoRA keeps its own copy of it: the reference never changes, also across resume.
    init_lora = run_reference_lora(cfg, run_dir, fresh=resume_path is None, write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed + rank)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32

    # 3. Models: frozen components in the weight dtype; the policy's trainable weights in fp32, and its reference.
    components, policy, weight_dtype = setup_policy(cfg, accelerator.device, init_lora=init_lora,
                                                    encoders=manifest is None, precomputed_reference=precomputed)
    params = policy.params

    # 4. Optimizer and schedule (one schedule step per optimizer step).
    optimizer = build_optimizer(params, cfg.optim)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # "auto" values it cannot read off a DataLoader
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", cfg.train.batch_size),
                           ("gradient_clipping", cfg.optim.max_grad_norm or 0.0)):
            if ds_config.get(key, "auto") == "auto":
                ds_config[key] = value
    unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    scaler = accelerator.scaler
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    _check_accumulation(accelerator, cfg)  # again: DeepSpeed's own config may set it

    # 5. Resume: weights, optimizer, schedule, RNG, data position.
    step, data_state = 0, {"epoch": 0, "batch_in_epoch": 0}
    if resume_path is not None:
        weights, data_state = ckpt.load_checkpoint(
            resume_path, optimizer=None if sharded else optimizer.optimizer, lr_scheduler=lr_scheduler, scaler=scaler
        )
        if sharded:  # weights and optimizer shards, each process its own
            accelerator.load_state(str(resume_path / ckpt.SHARDED_STATE))
        else:
            policy.load_trainable_state_dict(weights)
        step = data_state["step"]
        log.info("resumed from %s at step %d", resume_path, step)
    if dataset is None:
        stream = StreamedPairStream(cfg.data, cfg.train.batch_size, cfg.train.seed, world, rank, data_state)
    else:
        stream = PairStream(dataset, cfg.data, cfg.train.batch_size, cfg.train.seed, world, rank,
                            data_state["epoch"], data_state["batch_in_epoch"])
        stream.skipped = dict(data_state.get("skipped_in_training", {}))

    # 6. Logging: metrics.jsonl and TensorBoard on the main process; a progress bar with ETA.
    metrics_path = run_dir / METRICS_FILE
    writer = None
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, step)
        if cfg.output.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "logs"))
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="lora-dpo", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    log.info(
        "training %s (%s, %s mode, %.1fM trainable parameters, loss %s) on %s %s: %d steps × %d %s × %d accumulation "
        "× %d processes", cfg.model.pretrained_model_name_or_path, components.family, policy.mode,
        sum(p.numel() for p in params) / 1e6, cfg.loss.describe(), len(dataset) if dataset is not None else "streamed",
        unit, cfg.train.max_steps, cfg.train.batch_size, unit, cfg.train.gradient_accumulation_steps, world,
    )

    def save(at_step: int) -> Path | None:
        # FSDP / DeepSpeed shard the optimizer state (FSDP the weights too): every process takes part.
        weights = policy.trainable_state_dict(accelerator.get_state_dict(unet) if sharded else None)
        if sharded:
            staging = ckpt.staging_folder(run_dir, at_step)
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging / ckpt.SHARDED_STATE))
            accelerator.wait_for_everyone()
        path = None
        if accelerator.is_main_process:
            path = ckpt.save_checkpoint(
                run_dir, at_step, weights=weights, optimizer=None if sharded else optimizer.optimizer,
                lr_scheduler=lr_scheduler, scaler=scaler,
                trainer_state={**stream.state(), "num_processes": world, "batch_size": cfg.train.batch_size},
                recipe_yaml=cfg.to_yaml(), total_limit=cfg.train.checkpoints_total_limit,
            )
        accelerator.wait_for_everyone()
        return path

    # 7. The loop: one iteration = one optimizer step over gradient_accumulation_steps micro-batches.
    accum = cfg.train.gradient_accumulation_steps
    T = components.noise_scheduler.config.num_train_timesteps
    micro_step = kto_micro_step if kto else dpo_micro_step
    rising = BothErrorsRising(unpaired=kto)  # the failure Diffusion-SDPO describes: warned once
    final: dict[str, float] = {}
    stopped: str | None = None
    with _StopSignal() as stop:
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            examples = 0  # pairs, or KTO's images
            for _ in range(accum):
                batch = stream.next()
                with accelerator.accumulate(unet):  # gradients are synchronised on the last micro-batch only
                    loss, metrics = micro_step(components, unet, policy.reference, batch, cfg.loss, accelerator,
                                               weight_dtype)
                    if not torch.isfinite(loss).all():
                        last = ckpt.list_checkpoints(run_dir)
                        raise TrainingDiverged(
                            f"loss is {loss.float().mean().item()} at step {step + 1}: training stopped. Last good "
                            f"checkpoint: {last[-1] if last else 'none'}. Lower optim.lr or loss.beta, or use "
                            "train.mixed_precision=bf16 instead of fp16."
                        )
                    accelerator.backward(loss.mean())  # accelerate divides by the accumulation steps
                if "rewards/margins" in metrics:  # margins by timestep bucket: sums and counts, reduced below
                    metrics = {**metrics, **timestep_bucket_sums(metrics["rewards/margins"], metrics["timestep"], T)}
                for name, value in {"loss": loss.detach(), **metrics}.items():
                    sums[name] = sums.get(name, 0) + value.sum()
                examples += len(batch)
            grad_norm = None
            if cfg.optim.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            lr_used = lr_scheduler.get_last_lr()[0]
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # Metrics: means over every pair (image) of the step, across processes; the means over some of them
            # (sums and counts, lora_dpo.training.diagnostics.masked_sums) as their ratios.
            # Every process must hold the same metric names in the same order: KTO's label-wise sums are always there.
            counted = torch.tensor(float(examples), device=accelerator.device)
            totals = accelerator.reduce(torch.stack([*sums.values(), counted]), "sum")
            final = ratio_means({name: (totals[i] / totals[-1]).item() for i, name in enumerate(sums)})
            if "rewards/margins" not in final and {"rewards/chosen", "rewards/rejected"} <= set(final):  # KTO
                final["rewards/margins"] = final["rewards/chosen"] - final["rewards/rejected"]
            if cfg.loss.needs_reference:
                warning = rising.update(final)
                if warning:
                    log.warning(warning)
                final["diagnostics/both_errors_rising"] = rising.flag
            final.update(
                step=step, epoch=stream.epoch, learning_rate=lr_used,
                **{f"{unit}_per_second": totals[-1].item() / (time.perf_counter() - started)},
                peak_memory_gb=peak_memory_gb(accelerator.device),
                **{"data/skipped_rows": sum(stream.skipped.values())},
            )
            if grad_norm is not None:
                final["grad_norm"] = float(grad_norm)
            bar.update(1)
            shown = {"loss": f"{final['loss']:.4f}"}
            if "rewards/accuracies" in final:
                shown.update(acc=f"{final['rewards/accuracies']:.2f}", margin=f"{final['rewards/margins']:.3g}")
            bar.set_postfix(shown)
            if accelerator.is_main_process and (step == 1 or step % cfg.train.log_every == 0 or step == cfg.train.max_steps):
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(final) + "\n")
                if writer is not None:
                    for name, value in final.items():
                        if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                            writer.add_scalar(name, value, step)

            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
                save(step)
            if stop.received:
                stopped = stop.received
                if step % cfg.train.checkpoint_every and step != cfg.train.max_steps:
                    save(step)
                break
    bar.close()
    if writer is not None:
        writer.close()

    # 8. Export: the adapter (or full pipeline) in the diffusers format, the resolved recipe (already written),
    # the model card.
    result = TrainResult(run_dir=run_dir, step=step, final_metrics=final, interrupted=stopped, model=policy.unet,
                         policy=policy, is_main_process=accelerator.is_main_process)
    if stopped:
        log.warning("stopped by %s at step %d; resume with train.resume_from=latest", stopped, step)
        return result
    if dataset is None:  # the counts of every process's share, over its first pass
        data_report = {**data_report, **merge_reports(gather_object([stream.pairs.report()]))}
    full_state = accelerator.get_state_dict(unet) if sharded else None  # every process takes part
    if accelerator.is_main_process:
        data_report = {**data_report, "skipped_in_training": stream.skipped}
        (run_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
        result.adapter_path = policy.export(run_dir, cfg, components.family, full_state)
        write_model_card(run_dir, cfg, components.family, final, data_report)
    accelerator.wait_for_everyone()
    return result

"""The training recipe: :class:`PreferenceRecipe`, in torchtune's shape (``setup`` from ``_setup_*`` steps, each
reading its own section of the recipe; one loop, ``train``; ``save_checkpoint``), and :func:`train`, its entry point.

Policy and reference come from :mod:`lora_dpo.models.policy`: base UNet + trainable LoRA against the same UNet with the
adapter disabled (``train.mode: lora``), or the whole UNet against a frozen copy (``train.mode: full``). The loss
type's row of :data:`lora_dpo.losses.LOSSES` names the micro-step (:mod:`lora_dpo.training.steps`) and the unit
(pairs or labeled images) the loop counts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from lora_dpo.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RecipeConfig,
    TrainConfig,
)
from lora_dpo.data.cache import check_cache
from lora_dpo.data.loader import MicroBatches, StreamedMicroBatches
from lora_dpo.data.streaming import merge_reports
from lora_dpo.errors import TrainingDiverged
from lora_dpo.export.artifacts import export_policy, training_caption, write_model_card
from lora_dpo.models.lora_files import check_adapter_fits_model
from lora_dpo.models.policy import Policy, run_reference_lora
from lora_dpo.training import checkpoint as ckpt
from lora_dpo.training.diagnostics import BothErrorsRising, step_means, timestep_bucket_sums
from lora_dpo.training.guards import NonFiniteGrads, WeightsMoved, all_finite, grad_norm_value
from lora_dpo.training.memory import peak_memory_gb
from lora_dpo.training.optim import build_lr_scheduler, build_optimizer, check_optimizer_available
from lora_dpo.training.run_folder import MetricsLog, RunLock, StopSignal, check_resume_layout, prepare_run_dir
from lora_dpo.training.setup import (
    attention_kernels,
    check_accumulation,
    fill_deepspeed_config,
    open_training_data,
    recipe_family,
    setup_policy,
    torch_threads,
)
from lora_dpo.training.steps import MICRO_STEPS

__all__ = ["PreferenceRecipe", "TrainResult", "TrainingDiverged", "train"]

log = logging.getLogger(__name__)


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


class PreferenceRecipe:
    """One training run of a recipe: :meth:`setup`, then :meth:`train` (the loop, then the export).

    ``setup`` runs the cheap checks before any weight loads (model folder or id, optimizer, latent cache, data set,
    resume point, starting LoRA), then the accelerator, the run folder, the models, the optimizer, the resumed state,
    the micro-batches and the logs, each ``_setup_*`` step reading only its own section of the recipe.

    Use it as a context manager: ``setup`` takes the run folder's lock (:class:`RunLock`, one run per folder) and
    the block's exit releases it, however the run ends.
    """

    def __init__(self, cfg: RecipeConfig):
        self.cfg, self.run_dir = cfg, cfg.run_dir
        self.loss, self.unit = cfg.loss, cfg.loss.unit  # unit: what train.batch_size counts, pairs or images
        self.step, self.final, self.stopped = 0, {}, None
        self._held = ExitStack()  # the run folder's lock, from setup to the end of the run

    def __enter__(self) -> PreferenceRecipe:
        return self

    def __exit__(self, *exc) -> bool:
        self._held.close()
        return False

    # ------------------------------------------------------------------------------------------------------
    # Setup

    def setup(self) -> None:
        cfg = self.cfg
        # 1. Cheap checks first, before any weight loads: model folder/id, data set, run folder, resume point.
        family = recipe_family(cfg)  # the model's index and the options its family takes
        check_optimizer_available(cfg.optim)
        self._held.enter_context(torch_threads(cfg.train.num_threads))  # restored when the run ends
        # One run per folder, taken before the data is read so that a second run stops at once; the global main
        # process holds it (RANK: the accelerator is not up yet).
        self._held.enter_context(RunLock(self.run_dir, enabled=int(os.environ.get("RANK", "0")) == 0))
        # encoded pairs (and maybe reference errors) instead of images: a keyed, checked cache
        self.manifest = check_cache(cfg, cfg.data.latent_cache) if cfg.data.latent_cache else None
        self._setup_data(cfg.data, cfg.train.seed)
        self.precomputed = bool(self.manifest and self.manifest["key"]["reference_draws"]) and self.loss.needs_reference
        self.resume_path = ckpt.resolve_resume(cfg.train.resume_from, self.run_dir) if cfg.train.resume_from else None
        self._check_starting_lora(cfg.lora, cfg.model, cfg.train.mode)
        # 2. Accelerator and the run folder; 3. models; 4. optimizer; 5. resume; 6. logging.
        self._setup_accelerator(cfg.train)
        self._held.enter_context(attention_kernels(family, self.accelerator.device))  # restored when the run ends
        self._setup_run_folder(cfg.output)
        self._setup_model()
        self._setup_optimizer(cfg.optim, cfg.train.max_steps, cfg.train.batch_size)
        data_state = self._setup_resume()
        self._setup_batches(cfg.data, cfg.train.batch_size, cfg.train.seed, data_state)
        self._setup_logging(cfg.output)

    def _setup_data(self, data: DataConfig, seed: int) -> None:
        """The data set (None when streamed: opened per process once the processes are known) and its report."""
        self.dataset, self.data_report = open_training_data(data, self.unit, seed, self.manifest)

    def _check_starting_lora(self, lora: LoraConfig, model: ModelConfig, mode: str) -> None:
        """``lora.init_from`` (LoRA mode only): safetensors that fit the model. A resumed run reads its own copy
        instead (:meth:`_setup_run_folder`)."""
        if self.resume_path is None and lora.init_from and mode == "lora":
            check_adapter_fits_model(lora.init_from, model.pretrained_model_name_or_path, model.revision)

    def _setup_accelerator(self, train: TrainConfig) -> None:
        """Mixed precision and processes. The training draws are keyed by pair (:mod:`lora_dpo.data.draws`), so each
        process draws its own; the global seed (LoRA dropout) differs per process, the initial weights are rank 0's.

        On a machine without CUDA, accelerate joins a (gloo) process group only when told it runs on the CPU.
        Gradient accumulation is accelerate's (``accumulate``): it syncs DDP/FSDP gradients on the last micro-batch
        only and hands DeepSpeed its own accumulation."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = Accelerator(mixed_precision=train.mixed_precision,
                                       gradient_accumulation_steps=train.gradient_accumulation_steps,
                                       cpu=launched > 1 and not torch.cuda.is_available())
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        if not self.is_main:
            logging.getLogger("lora_dpo").setLevel(logging.WARNING)
        check_accumulation(self.accelerator, train.gradient_accumulation_steps)
        if self.resume_path is not None:
            check_resume_layout(self.resume_path, self.world, train.batch_size)
        if self.world != launched:
            raise RuntimeError(
                f"launched as {launched} processes but accelerate sees {self.world}: the processes would train "
                "separately and overwrite each other's run folder; launch with `accelerate launch` or `torchrun`"
            )
        if self.dataset is not None and len(self.dataset) < train.batch_size * self.world:
            raise ValueError(
                f"{len(self.dataset)} {self.unit} remain after filtering, fewer than train.batch_size × processes = "
                f"{train.batch_size * self.world}; lower train.batch_size or add data"
            )

    def _setup_run_folder(self, output: OutputConfig) -> None:
        """The run folder (main process): checked, the resolved recipe and the data report written. The starting LoRA
        is resolved here, once: a run started from a LoRA keeps its own copy of it (``self.init_lora``), so the
        reference never changes, also across resume."""
        if self.is_main:
            prepare_run_dir(self.run_dir, output, resuming=self.cfg.train.resume_from is not None)
            (self.run_dir / "recipe.yaml").write_text(self.cfg.to_yaml())
            (self.run_dir / "data_report.json").write_text(json.dumps(self.data_report, indent=2))
        self.init_lora = run_reference_lora(self.cfg, self.run_dir, fresh=self.resume_path is None,
                                            write=self.is_main)
        self.accelerator.wait_for_everyone()

    def _setup_model(self) -> None:
        """Seeds, then the frozen components in the weight dtype; the policy's trainable weights in fp32, and its
        reference (:func:`setup_policy`: the model, LoRA, reference and precision sections)."""
        set_seed(self.cfg.train.seed + self.rank)
        if self.accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.cfg.train.allow_tf32
        self.components, self.policy, self.weight_dtype = setup_policy(
            self.cfg, self.accelerator.device, init_lora=self.init_lora, encoders=self.manifest is None,
            precomputed_reference=self.precomputed)
        self.micro_step = MICRO_STEPS[self.loss.spec.step]
        self.num_train_timesteps = self.components.noise_scheduler.config.num_train_timesteps

    def _setup_optimizer(self, optim: OptimConfig, max_steps: int, batch_size: int) -> None:
        """Optimizer and schedule (one schedule step per optimizer step), prepared by accelerate."""
        optimizer = build_optimizer(self.policy.params, optim)
        self.lr_scheduler = build_lr_scheduler(optimizer, optim, max_steps)
        accelerator = self.accelerator
        fill_deepspeed_config(accelerator, batch_size, optim.max_grad_norm)
        self.unet, self.optimizer = accelerator.prepare(self.policy.unet, optimizer)
        self.scaler = accelerator.scaler
        self.sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        check_accumulation(accelerator, self.cfg.train.gradient_accumulation_steps)  # again: DeepSpeed may set it

    def _setup_resume(self) -> dict:
        """Weights, optimizer, schedule, RNG from ``self.resume_path``; returns the data position to resume at."""
        data_state = {"epoch": 0, "batch_in_epoch": 0}
        self.nonfinite = NonFiniteGrads(self.cfg.train.stop_after_nonfinite_grads)
        if self.resume_path is None:
            self.moved = WeightsMoved(self.policy.params)
            return data_state
        weights, data_state = ckpt.load_checkpoint(
            self.resume_path, optimizer=None if self.sharded else self.optimizer.optimizer,
            lr_scheduler=self.lr_scheduler, scaler=self.scaler, verify=False,  # resolve_resume verified it
        )
        if self.sharded:  # weights and optimizer shards, each process its own
            self.accelerator.load_state(str(self.resume_path / ckpt.SHARDED_STATE))
        else:
            self.policy.load_trainable_state_dict(weights)
        self.step = data_state["step"]
        self.nonfinite.in_row = data_state.get("nonfinite_grads_in_row", 0)
        self.moved = WeightsMoved(self.policy.params, moved_before=data_state.get("weights_moved", False))
        log.info("resumed from %s at step %d", self.resume_path, self.step)
        return data_state

    def _setup_batches(self, data: DataConfig, batch_size: int, seed: int, data_state: dict) -> None:
        """This process's endless micro-batches, from the resumed data position."""
        if self.dataset is None:
            self.batches = StreamedMicroBatches(data, batch_size, seed, self.world, self.rank, data_state)
        else:
            self.batches = MicroBatches(self.dataset, data, batch_size, seed, self.world, self.rank,
                                        data_state["epoch"], data_state["batch_in_epoch"])
            self.batches.skipped = dict(data_state.get("skipped_in_training", {}))

    def _setup_logging(self, output: OutputConfig) -> None:
        """metrics.jsonl and TensorBoard on the main process; a progress bar with ETA; the run's summary line."""
        cfg = self.cfg
        self.metrics_log = MetricsLog(self.run_dir, self.step, output.tensorboard, self.is_main)
        self.bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="lora-dpo", unit="step",
                        disable=not self.is_main, dynamic_ncols=True)
        self.rising = BothErrorsRising(unpaired=self.unit == "images")  # the failure Diffusion-SDPO describes
        log.info(
            "training %s (%s, %s mode, %.1fM trainable parameters, loss %s) on %s %s: %d steps × %d %s × %d "
            "accumulation × %d processes", cfg.model.pretrained_model_name_or_path, self.components.family,
            self.policy.mode, sum(p.numel() for p in self.policy.params) / 1e6, self.loss.describe(),
            len(self.dataset) if self.dataset is not None else "streamed", self.unit, cfg.train.max_steps,
            cfg.train.batch_size, self.unit, cfg.train.gradient_accumulation_steps, self.world,
        )

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints and the loop

    def save_checkpoint(self, step: int) -> Path | None:
        """A checkpoint of ``step`` (:func:`lora_dpo.training.checkpoint.save_checkpoint`); its path on the main
        process. FSDP / DeepSpeed shard the optimizer state (FSDP the weights too): every process takes part."""
        accelerator, sharded = self.accelerator, self.sharded
        weights = self.policy.trainable_state_dict(accelerator.get_state_dict(self.unet) if sharded else None)
        if not self._everywhere(all_finite(weights.values())):
            raise self._diverged(f"the trainable weights are not finite after step {step}", weights_bad=False)
        if sharded:
            staging = ckpt.staging_folder(self.run_dir, step)
            if self.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging / ckpt.SHARDED_STATE))
            accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            train = self.cfg.train
            path = ckpt.save_checkpoint(
                self.run_dir, step, weights=weights, optimizer=None if sharded else self.optimizer.optimizer,
                lr_scheduler=self.lr_scheduler, scaler=self.scaler,
                trainer_state={**self.batches.state(), "num_processes": self.world, "batch_size": train.batch_size,
                               "nonfinite_grads_in_row": self.nonfinite.in_row, "weights_moved": self.moved.moved()},
                recipe_yaml=self.cfg.to_yaml(), total_limit=train.checkpoints_total_limit,
            )
        accelerator.wait_for_everyone()
        return path

    def train(self) -> TrainResult:
        """The loop, one iteration = one optimizer step over ``gradient_accumulation_steps`` micro-batches, then the
        export. A SIGINT/SIGTERM finishes the step, saves a checkpoint and returns (``interrupted``)."""
        train = self.cfg.train
        with StopSignal() as stop, self.bar, closing(self.metrics_log):  # bar and logs closed however it ends
            while self.step < train.max_steps:
                started = time.perf_counter()
                sums, examples = self._accumulate_gradients(train.gradient_accumulation_steps)
                lr_used, grad_norm = self._optimizer_step(self.cfg.optim.max_grad_norm)
                self.step += 1
                self.final = self._step_metrics(sums, examples, started, lr_used, grad_norm)
                self._show_and_log(self.final, train.log_every, train.max_steps)
                if self.nonfinite.exhausted:
                    raise self._diverged(f"the gradient norm was NaN/Inf {self.nonfinite.in_row} steps in a row "
                                         f"(to step {self.step}; each was skipped)", weights_bad=False)
                if self.step % train.checkpoint_every == 0 or self.step == train.max_steps:
                    self.save_checkpoint(self.step)
                if stop.received:
                    self.stopped = stop.received
                    if self.step % train.checkpoint_every and self.step != train.max_steps:
                        self.save_checkpoint(self.step)
                    break
        return self._export()

    def _accumulate_gradients(self, accumulation_steps: int) -> tuple[dict[str, torch.Tensor], int]:
        """Forward and backward over the step's micro-batches; returns the metrics summed over its examples (pairs, or
        labeled images) and their count."""
        accelerator = self.accelerator
        sums: dict[str, torch.Tensor] = {}
        examples = 0
        for _ in range(accumulation_steps):
            batch = self.batches.next()
            with accelerator.accumulate(self.unet):  # gradients are synchronised on the last micro-batch only
                loss, metrics = self.micro_step(self.components, self.unet, self.policy.reference, batch, self.loss,
                                                accelerator, self.weight_dtype)
                if not torch.isfinite(loss).all():
                    raise self._diverged(f"loss is {loss.float().mean().item()} at step {self.step + 1}",
                                         weights_bad=True)
                accelerator.backward(loss.mean())  # accelerate divides by the accumulation steps
            if "rewards/margins" in metrics:  # margins by timestep bucket: sums and counts, reduced below
                buckets = timestep_bucket_sums(metrics["rewards/margins"], metrics["timestep"],
                                               self.num_train_timesteps)
                metrics = {**metrics, **buckets}
            for name, value in {"loss": loss.detach(), **metrics}.items():
                sums[name] = sums.get(name, 0) + value.sum()
            examples += len(batch)
        return sums, examples

    def _optimizer_step(self, max_grad_norm: float | None) -> tuple[float, float | None]:
        """Clip (``max_grad_norm`` None: measure only), step, schedule, zero the gradients; returns the learning rate
        used and the gradient norm. A NaN/Inf norm skips the step (:class:`NonFiniteGrads`). Under fp16 the loss
        scaler skips an overflow itself and halves its scale; only overflows at a scale of 1 or less (the gradients
        are NaN/Inf unscaled) count towards ``train.stop_after_nonfinite_grads``."""
        grad_norm = grad_norm_value(self.accelerator.clip_grad_norm_(self.policy.params, max_grad_norm or math.inf))
        lr_used = self.lr_scheduler.get_last_lr()[0]
        scaler_overflow = (grad_norm is not None and not math.isfinite(grad_norm) and self.scaler is not None
                           and self.scaler.get_scale() > 1.0)  # the fp16 scaler's: it skips and halves its scale
        skipped = False if scaler_overflow else self.nonfinite.update(grad_norm)
        if not skipped or self.scaler is not None:  # fp16: the scaler sees the NaN/Inf, skips, lowers its scale
            self.optimizer.step()
        if not skipped and not self.accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr_used, grad_norm

    def _step_metrics(self, sums: dict[str, torch.Tensor], examples: int, started: float, lr_used: float,
                      grad_norm: float | None) -> dict[str, float]:
        """The step's logged metrics: the means of :func:`lora_dpo.training.diagnostics.step_means`, the diagnostics,
        the position, the learning rate used, the throughput, memory and gradient norm."""
        final, total = step_means(sums, examples, self.accelerator)
        if self.loss.needs_reference:
            warning = self.rising.update(final)
            if warning:
                log.warning(warning)
            final["diagnostics/both_errors_rising"] = self.rising.flag
        final.update(
            step=self.step, epoch=self.batches.epoch, learning_rate=lr_used,
            **{f"{self.unit}_per_second": total / (time.perf_counter() - started)},
            peak_memory_gb=peak_memory_gb(self.accelerator.device),
            **{"data/skipped_rows": sum(self.batches.skipped.values())},
        )
        if grad_norm is not None:
            final["grad_norm"] = grad_norm
        if self.step == self.cfg.train.max_steps:
            final["diagnostics/weights_moved"] = float(not self._everywhere(not self.moved.moved()))
        return final

    def _everywhere(self, flag: bool) -> bool:
        """``flag`` holds on every process (one reduction when there are several)."""
        if self.world == 1:
            return flag
        bad = torch.tensor([0.0 if flag else 1.0], device=self.accelerator.device)
        return self.accelerator.reduce(bad, reduction="sum").item() == 0

    def _diverged(self, what: str, weights_bad: bool) -> TrainingDiverged:
        """The error that stops a diverged run. ``weights_bad``: the current weights (step ``self.step``) produced it,
        so a checkpoint of this step is not good: it is set aside (``quarantine_checkpoint``) and ``latest`` points
        at the newest earlier checkpoint that verifies."""
        good = None
        if self.is_main:
            if weights_bad:
                ckpt.quarantine_checkpoint(self.run_dir, self.step,
                                           f"{what}: the weights of step {self.step} produced it")
            good = ckpt.last_good_checkpoint(self.run_dir)
        where = (f"Last good checkpoint: {good} (train.resume_from=latest resumes it)" if good
                 else "No good checkpoint is kept")
        fp16 = ", or use train.mixed_precision=bf16 instead of fp16" if self.cfg.train.mixed_precision == "fp16" else ""
        return TrainingDiverged(f"{what}: training stopped. {where}. Lower optim.lr or loss.beta{fp16}.")

    def _show_and_log(self, final: dict[str, float], log_every: int, max_steps: int) -> None:
        """The progress bar; metrics.jsonl and TensorBoard at step 1, every ``log_every`` steps and the last."""
        self.bar.update(1)
        shown = {"loss": f"{final['loss']:.4f}"}
        if "rewards/accuracies" in final:
            shown.update(acc=f"{final['rewards/accuracies']:.2f}", margin=f"{final['rewards/margins']:.3g}")
        self.bar.set_postfix(shown)
        if self.step == 1 or self.step % log_every == 0 or self.step == max_steps:
            self.metrics_log.write(final, self.step)

    def _export(self) -> TrainResult:
        """The adapter (or full pipeline) in the diffusers format, the final data report and the model card; the
        resolved recipe is already written. Nothing is exported after a signal."""
        result = TrainResult(run_dir=self.run_dir, step=self.step, final_metrics=self.final, interrupted=self.stopped,
                             model=self.policy.unet, policy=self.policy, is_main_process=self.is_main)
        if self.stopped:
            log.warning("stopped by %s at step %d; resume with train.resume_from=latest", self.stopped, self.step)
            return result
        if not self.final.get("diagnostics/weights_moved", 1.0):
            log.warning("the trainable weights never moved in this run: every step was skipped or changed nothing "
                        "(see grad_norm in metrics.jsonl); the export is the starting model. Lower loss.beta or "
                        "optim.lr, or check the data")
        data_report = self.data_report
        if self.dataset is None:  # the counts of every process's share, over its first pass
            data_report = {**data_report, **merge_reports(gather_object([self.batches.pairs.report()]))}
        full_state = self.accelerator.get_state_dict(self.unet) if self.sharded else None  # every process takes part
        if self.is_main:
            data_report = {**data_report, "skipped_in_training": self.batches.skipped}
            (self.run_dir / "data_report.json").write_text(json.dumps(data_report, indent=2))
            family = self.components.family
            result.adapter_path = export_policy(self.policy, self.run_dir, self.cfg, family, full_state)
            write_model_card(self.run_dir, self.cfg, family, self.final, data_report,
                             prompt=training_caption(self.dataset, self.cfg.data.caption_column),
                             call_kwargs=self.components.model_family.usage_kwargs(self.components, self.cfg.model))
        self.accelerator.wait_for_everyone()
        return result


def train(cfg: RecipeConfig) -> TrainResult:
    """Run the recipe (:class:`PreferenceRecipe`); returns where the adapter went and the final metrics.

    Raises:
        ConfigError / FileNotFoundError / ValueError / ModelLoadError: bad input, before any weight loads.
        RunFolderLocked: another process trains (or builds a cache) in ``output.dir``.
        CheckpointError: ``train.resume_from`` names a checkpoint that fails its verification.
        TrainingDiverged: the loss, the weights, or ``train.stop_after_nonfinite_grads`` gradient norms in a row became
            NaN/Inf (the last good checkpoint is kept).
    """
    with PreferenceRecipe(cfg) as recipe:
        recipe.setup()
        return recipe.train()


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (the accelerator, its mixed precision, the process group's view), so that
    a later :func:`train` in this process builds its ``Accelerator`` afresh: the demo, ``lora-dpo iterate`` and the
    benchmarks train several recipes in one process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()

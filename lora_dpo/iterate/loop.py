"""``lora-dpo iterate``: online, iterative Diffusion-DPO, one recipe and one folder.

Round r (1 .. R) of :func:`iterate`:

1. **Sample** ``iterate.candidates`` (N) images per prompt and group from the current policy: the base plus round
   r−1's adapter (the base alone in round 1, or the recipe's ``lora.init_from``). Candidate i of group j of round r
   takes the seed ``seed_offset + ((r−1)·groups_per_prompt + j)·N + i``: no two rounds share noise, and no
   evaluation seed is a training seed (the recipe's check).
2. **Score and pair** them (:func:`lora_dpo.feedback.prefs.build_candidate_set`: best against worst by default, as
   flow_grpo's online DPO pairs the best and worst samples of a prompt), written as ``round_r/prefs.parquet``.
3. **Train** the recipe on those pairs, round r−1's policy as the reference and the starting point
   (``lora.init_from``): the step-0 loss is ln 2 in every round, the adapter keeps accumulating, and the last
   round's file loads on the base alone with ``pipe.load_lora_weights``. Self-play against the previous iterate
   follows SPIN-Diffusion (Yuan et al. 2024, arXiv 2402.10210); a reference refreshed during training,
   BalancedDPO (arXiv 2503.12575).
4. **Evaluate** it against the base (``round_r/eval_base``, with the held-out implicit reward against the base and
   against round r−1) and against round r−1 (``round_r/eval_previous``), on the same prompts, seeds and held-out
   pairs in every round.

Each stage leaves a file that says it finished (``prefs.json`` with the parquet's SHA-256, the training run's
checkpoints and export, ``round.json`` with the adapter's SHA-256), so a run killed at any point and started again
with the same recipe resumes at the same round and training step, and ends with the same bytes
(``tests/test_iterate.py``). ``iterate.json`` (:mod:`lora_dpo.iterate.summary`) holds the table of rounds and
``iterate.png`` its figure; the final adapter is copied to the folder's ``pytorch_lora_weights.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from lora_dpo.config import RecipeConfig
from lora_dpo.errors import ConfigError
from lora_dpo.evaluation.implicit_reward import implicit_reward_accuracy
from lora_dpo.evaluation.run import evaluate_run
from lora_dpo.feedback.prefs import atomic_path, build_candidate_set
from lora_dpo.feedback.prompts import load_prompts
from lora_dpo.feedback.scorers import Scorer, load_scorer
from lora_dpo.inference.sampling import fused_adapters, load_pipeline, sampling_guidance
from lora_dpo.iterate.summary import FIGURE_FILE, SUMMARY_FILE, round_summary, write_summary
from lora_dpo.models.lora_files import WEIGHT_NAME, check_adapter_fits_model, load_adapter
from lora_dpo.models.pretrained import DTYPES
from lora_dpo.training import checkpoint as ckpt
from lora_dpo.training.recipe import reset_accelerate_state, train
from lora_dpo.training.run_folder import RunLock
from lora_dpo.training.setup import recipe_family, torch_threads

log = logging.getLogger(__name__)

RECIPE_FILE = "iterate_recipe.yaml"
PREFS_FILE, PREFS_REPORT = "prefs.parquet", "prefs.json"
TRAIN_DIR, EVAL_BASE_DIR, EVAL_PREVIOUS_DIR = "train", "eval_base", "eval_previous"
ROUND_FILE = "round.json"


def round_dir(run_dir: Path, r: int) -> Path:
    """The folder of round ``r`` (1-based)."""
    return Path(run_dir) / f"round_{r}"


@dataclass
class IterateResult:
    """What :func:`iterate` did: the folder, the round summaries (``round.json`` of each finished round), the final
    adapter (None unless every round finished) and the signal that stopped it (None when it ran to the end)."""

    run_dir: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)
    adapter_path: Path | None = None
    interrupted: str | None = None


class _Stopped(Exception):
    """A signal stopped a round's training (its checkpoint kept); ``args[0]``: the signal's name."""


@dataclass
class _Inputs:
    """What every round reads, loaded and checked once before anything samples."""

    prompts: list[str]
    eval_prompts: list[str]
    scorers: list[Scorer]
    device: torch.device
    dtype: torch.dtype
    guidance_scale: float


def check_inputs(cfg: RecipeConfig) -> _Inputs:
    """Everything :func:`iterate` reads, checked before any weights load or any image is sampled: the scorers (a
    missing folder, pickle weights), the prompt files (empty, no such column), the held-out pairs, the model's family
    and the recipe's options for it, and a starting LoRA that does not fit the model.

    Raises:
        ConfigError: no ``iterate.scorer``; ``train.mode=full``; launched as several processes. FileNotFoundError / ValueError: see :func:`load_prompts`,
        :func:`load_scorer`. ModelLoadError: the model cannot be read.
    """
    it = cfg.iterate
    if cfg.train.mode != "lora":
        raise ConfigError("lora-dpo iterate trains a LoRA adapter round after round (each round's reference is the "
                          "previous round's adapter): set train.mode=lora")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("lora-dpo iterate runs as one process (its sampling and evaluation are not distributed); "
                          "start it without accelerate launch / torchrun")
    if not it.scorer:
        raise ConfigError("iterate.scorer is empty: name at least one scorer ('jpeg', or a folder with "
                          "classifier.json, aesthetic.json or a CLIP config.json), e.g. iterate.scorer=[jpeg]")
    prompts = load_prompts(it.prompts, it.prompt_column)
    eval_prompts = load_prompts(it.eval_prompts, it.prompt_column) if it.eval_prompts else prompts
    if it.heldout_pairs is not None and not Path(it.heldout_pairs).exists():
        raise FileNotFoundError(f"iterate.heldout_pairs {it.heldout_pairs} not found (a Pick-a-Pic parquet of pairs "
                                "the rounds never train on)")
    recipe_family(cfg)  # the family's checks of the recipe, before any weights load
    if cfg.lora.init_from:
        check_adapter_fits_model(cfg.lora.init_from, cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorers = [load_scorer(spec, device=device, batch_size=it.sample_batch_size) for spec in it.scorer]
    precision = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.mixed_precision, "float32")
    guidance = sampling_guidance(it.guidance_scale, cfg.model.guidance_scale)
    return _Inputs(prompts, eval_prompts, scorers, device,
                   DTYPES[precision] if device.type == "cuda" else torch.float32, guidance)


def iterate(cfg: RecipeConfig, progress: bool = True) -> IterateResult:
    """Run ``cfg.iterate.rounds`` rounds of sample → score → pair → train → evaluate in ``cfg.run_dir`` (module
    docstring), resuming a folder that holds an earlier, interrupted or shorter run of the same recipe.

    Args:
        cfg: the recipe; its ``iterate`` section sets the rounds, the sampling and the evaluation, the other
            sections train every round (``train.max_steps`` steps a round).
        progress: progress bars (sampling, training, evaluation) on stderr.

    Sampling, training and evaluation all run in ``train.num_threads`` torch threads.
    Returns:
        :class:`IterateResult`.
    Raises:
        ConfigError: see :func:`check_inputs`; the folder holds a run of another recipe (without
            ``output.overwrite``); a finished round whose adapter no longer matches its ``round.json``.
        RunFolderLocked: another process works in the folder. Training errors as :func:`lora_dpo.training.recipe.train`.
    """
    inputs = check_inputs(cfg)
    run_dir = cfg.run_dir
    result = IterateResult(run_dir)
    with RunLock(run_dir, command="iterate"), torch_threads(cfg.train.num_threads):
        _prepare_folder(run_dir, cfg)
        previous = cfg.lora.init_from
        for r in range(1, cfg.iterate.rounds + 1):
            try:
                result.rounds.append(_run_round(cfg, inputs, r, previous, progress))
            except _Stopped as stop:
                result.interrupted = stop.args[0]
                return result
            previous = str(round_dir(run_dir, r) / TRAIN_DIR)
        result.adapter_path = _publish_adapter(run_dir, Path(previous))
        write_summary(run_dir, cfg, result.rounds)
    return result


def _prepare_folder(run_dir: Path, cfg: RecipeConfig) -> None:
    """Start the folder, or check that its rounds come from this recipe (any number of rounds: more rounds continue
    a finished run). ``output.overwrite`` deletes the rounds of an earlier run instead."""
    recipe_file = run_dir / RECIPE_FILE
    rounds = sorted(run_dir.glob("round_*"))
    if rounds and cfg.output.overwrite:
        log.info("output.overwrite: removing %d earlier round(s) from %s", len(rounds), run_dir)
        for folder in rounds:
            shutil.rmtree(folder)
        for name in (WEIGHT_NAME, SUMMARY_FILE, FIGURE_FILE):  # the earlier run's results go with its rounds
            (run_dir / name).unlink(missing_ok=True)
    elif rounds and recipe_file.is_file() and _comparable(recipe_file.read_text()) != _comparable(cfg.to_yaml()):
        raise ConfigError(f"{run_dir} holds the rounds of another recipe ({recipe_file} differs from this one). "
                          "Continue it with its own recipe, pick another output.dir / output.run_name, or pass "
                          "output.overwrite=true to start over")
    with atomic_path(recipe_file) as tmp:
        tmp.write_text(cfg.to_yaml())


def _comparable(recipe_yaml: str) -> dict[str, Any]:
    """A resolved recipe without the keys that may change between the sessions of one run: the number of rounds,
    the folder (``output.dir``, ``output.run_name``: a moved run), ``output.overwrite`` and ``train.resume_from``."""
    data = yaml.safe_load(recipe_yaml)
    data["iterate"].pop("rounds", None)
    for key in ("dir", "run_name", "overwrite"):
        data["output"].pop(key, None)
    data["train"].pop("resume_from", None)
    return data


def _run_round(cfg: RecipeConfig, inputs: _Inputs, r: int, previous: str | None, progress: bool) -> dict[str, Any]:
    """Round ``r``: each stage skipped when its file says it finished. Returns the round's summary; raises
    :class:`_Stopped` when a signal stopped the training (its checkpoint kept)."""
    folder = round_dir(cfg.run_dir, r)
    done = folder / ROUND_FILE
    if done.is_file():
        return _verified_round(done, folder)
    folder.mkdir(parents=True, exist_ok=True)
    log.info("round %d of %d: sampling from %s", r, cfg.iterate.rounds, previous or "the base model")
    prefs = _sample(cfg, inputs, r, previous, folder, progress)
    _train(cfg, folder, previous)
    evals = _evaluate(cfg, inputs, folder, previous, progress)
    summary = round_summary(r, folder, prefs, evals, previous)
    summary["adapter_sha256"] = ckpt.file_digest(folder / TRAIN_DIR / WEIGHT_NAME)["sha256"]
    with atomic_path(done) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _verified_round(done: Path, folder: Path) -> dict[str, Any]:
    """A finished round's summary, once its adapter's bytes match the SHA-256 it recorded."""
    summary = json.loads(done.read_text())
    adapter = folder / TRAIN_DIR / WEIGHT_NAME
    if not adapter.is_file() or ckpt.file_digest(adapter)["sha256"] != summary.get("adapter_sha256"):
        raise ConfigError(f"{adapter} is missing or differs from the adapter round {summary.get('round')} finished "
                          f"with ({done}); delete {done} to redo the round's training from its checkpoints")
    return summary


def _sample(cfg: RecipeConfig, inputs: _Inputs, r: int, previous: str | None, folder: Path,
            progress: bool) -> dict[str, Any]:
    """The round's candidates from the current policy, scored and paired into ``prefs.parquet``; the report is
    ``prefs.json`` (with the parquet's SHA-256). Skipped when both are there and match."""
    out, report_file = folder / PREFS_FILE, folder / PREFS_REPORT
    if out.is_file() and report_file.is_file():
        report = json.loads(report_file.read_text())
        if ckpt.file_digest(out)["sha256"] == report.get("sha256"):
            return report
    it = cfg.iterate
    pipe = load_pipeline(cfg.model.pretrained_model_name_or_path, device=inputs.device, dtype=inputs.dtype,
                         revision=cfg.model.revision, variant=cfg.model.variant)
    if previous:
        load_adapter(pipe, previous, "policy")
    total = len(inputs.prompts) * it.seeds_per_round
    with tqdm(total=total, desc=f"round {r}: candidates", unit="image", disable=not progress,
              dynamic_ncols=True) as bar, fused_adapters(pipe):
        report = build_candidate_set(
            pipe, inputs.scorers, inputs.prompts, it.candidates, out, pairing=it.pairing, k=it.top_k,
            min_gap=it.min_gap, vote=it.vote, seed_offset=it.seed_offset + (r - 1) * it.seeds_per_round,
            groups_per_prompt=it.groups_per_prompt, num_inference_steps=it.num_inference_steps,
            guidance_scale=inputs.guidance_scale, batch_size=it.sample_batch_size, resolution=cfg.data.resolution,
            on_batch=bar.update)
    del pipe
    if report["pairs"] < cfg.train.batch_size:
        raise ValueError(f"round {r} gave {report['pairs']} pairs ({report['skipped']} skipped), fewer than "
                         f"train.batch_size={cfg.train.batch_size}: raise iterate.groups_per_prompt or lower "
                         "iterate.min_gap")
    report = {**report, "sha256": ckpt.file_digest(out)["sha256"], "sampled_from": previous or "base"}
    with atomic_path(report_file) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _train(cfg: RecipeConfig, folder: Path, previous: str | None) -> None:
    """Train the round (``round_r/train``): the recipe on the round's pairs, starting from and compared with round
    r−1's policy; resumed from its latest checkpoint when it has one. Raises :class:`_Stopped` when a signal stopped
    it."""
    run = folder / TRAIN_DIR
    resume = "latest" if ckpt.list_checkpoints(run) else None
    round_cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"dataset": str(folder / PREFS_FILE)}),
        "lora": cfg.lora.model_copy(update={"init_from": previous}),
        "train": cfg.train.model_copy(update={"resume_from": resume}),
        "output": cfg.output.model_copy(update={"dir": str(run), "overwrite": True}),
    })
    try:
        result = train(round_cfg)
    finally:  # a later train() in this process starts afresh
        reset_accelerate_state()
    if result.interrupted:
        raise _Stopped(result.interrupted)


def _evaluate(cfg: RecipeConfig, inputs: _Inputs, folder: Path, previous: str | None,
              progress: bool) -> dict[str, Any]:
    """The round's adapter against the base (images, and the held-out implicit reward against the base and, after
    round 1, against round r−1) and against round r−1 (images). Returns ``{"base", "previous", "implicit_base",
    "implicit_previous"}`` (None where not measured)."""
    it, run = cfg.iterate, folder / TRAIN_DIR
    common = dict(scorer_spec=inputs.scorers[0], prompts=inputs.eval_prompts, seeds_per_prompt=it.eval_seeds_per_prompt,
                  seed_offset=it.eval_seed_offset, num_inference_steps=it.num_inference_steps,
                  guidance_scale=inputs.guidance_scale, batch_size=it.sample_batch_size, device=str(inputs.device),
                  progress=progress)
    evals: dict[str, Any] = {"base": evaluate_run(run, out_dir=folder / EVAL_BASE_DIR, **common),
                             "previous": None, "implicit_base": None, "implicit_previous": None}
    if previous:
        evals["previous"] = evaluate_run(run, out_dir=folder / EVAL_PREVIOUS_DIR, reference_adapter=previous, **common)
    if it.heldout_pairs:
        heldout = dict(draws=it.implicit_draws, device=inputs.device)
        evals["implicit_base"] = implicit_reward_accuracy(run, cfg, it.heldout_pairs, reference="base", **heldout)
        if previous:
            evals["implicit_previous"] = implicit_reward_accuracy(run, cfg, it.heldout_pairs, reference="run",
                                                                  **heldout)
    return evals


def _publish_adapter(run_dir: Path, last: Path) -> Path:
    """Copy the last round's adapter to ``run_dir/pytorch_lora_weights.safetensors`` (atomically): the folder then
    loads with ``pipe.load_lora_weights(run_dir)``."""
    target = run_dir / WEIGHT_NAME
    with atomic_path(target) as tmp:
        shutil.copyfile(last / WEIGHT_NAME, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    return target

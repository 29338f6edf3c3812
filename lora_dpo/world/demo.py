"""The offline demo, and a small real-photo preference set for tests.

``lora-dpo demo`` trains ``recipes/digits/lora_dpo.yaml`` on the committed digits world (``worlds/digits``: a small
real text-to-image model, its digit-classifier scorer and AI-feedback preference pairs; see :mod:`lora_dpo.world.build`)
and evaluates the result against the base model (``lora-dpo eval``): win rate, classifier accuracy, diversity,
implicit-reward accuracy, a side-by-side grid and the training curves. ``--world digits-sd3`` does the same with
Flow-DPO on the SD3-layout world (``worlds/digits-sd3``, ``recipes/digits-sd3``; :mod:`lora_dpo.world.flow`).

:func:`build_photo_pairs` writes preference pairs made from real photographs that ship inside scikit-image
(``skimage/data``) and scikit-learn (``sklearn/datasets/images``): the same crop of one photograph twice, clean
(preferred) and degraded by blur, noise or heavy JPEG compression (rejected), in random order; about one pair in
ten is a tie. The tests use it as real RGB data of several sizes.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
import sklearn.datasets
from PIL import Image, ImageFilter

from lora_dpo.config import load_config
from lora_dpo.evaluation.run import evaluate_run
from lora_dpo.feedback.prompts import load_prompts
from lora_dpo.iterate.loop import IterateResult, iterate
from lora_dpo.training.recipe import reset_accelerate_state, train
from lora_dpo.training.setup import torch_threads
from lora_dpo.world.worlds import DEFAULT_WORLD, WORLDS, get_world

log = logging.getLogger(__name__)

DIGITS_RECIPE = WORLDS["digits"].recipe("lora_dpo")
ITERATE_RECIPE = WORLDS["digits"].recipe("iterate")
# Torch intra-op threads for the demo (the digits world's model is small: many small ops, each too short to gain
# from a second thread and badly slowed by one when another process shares the cores). None: torch's own default
# (one per core). `benchmarks/demo_threads.py` measures the choice; this line is the default `lora-dpo demo` uses.
DEMO_NUM_THREADS: int | None = 1

# Draws per held-out pair for the demo's implicit-reward accuracy. `lora-dpo eval` uses 256 (its standard error from
# the draws under 0.01); 256 would add about 5 minutes to a demo that must stay near 3, so the demo takes 4 and prints
# that error with it (0.022 on the digits world: benchmarks/results/implicit_draws_cpu.json).
DEMO_IMPLICIT_DRAWS = 4

# (file, caption); files from skimage/data unless marked sklearn.
PHOTOS = [
    ("astronaut.png", "a photo of an astronaut"), ("chelsea.png", "a photo of a cat"),
    ("coffee.png", "a cup of coffee"), ("rocket.jpg", "a rocket on a launch pad"),
    ("hubble_deep_field.jpg", "galaxies in deep space"), ("motorcycle_left.png", "a motorcycle"),
    ("retina.jpg", "a photo of a retina"), ("camera.png", "a man with a camera"), ("coins.png", "old coins"),
    ("moon.png", "the surface of the moon"), ("grass.png", "grass"), ("brick.png", "a brick wall"),
    ("sklearn:china.jpg", "a chinese temple"), ("sklearn:flower.jpg", "a flower"),
]


def _photo_path(name: str) -> Path:
    if name.startswith("sklearn:"):
        return Path(sklearn.datasets.__file__).parent / "images" / name.split(":", 1)[1]
    return Path(skimage.data.__file__).parent / name


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    kind = rng.integers(3)
    if kind == 0:
        return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.0, 4.0))))
    if kind == 1:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0, rng.uniform(30, 60), arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return Image.open(io.BytesIO(_jpeg(img, quality=int(rng.integers(2, 6)))))


def build_photo_pairs(path: str | Path, pairs_per_photo: int = 16, size: int = 64, tie_rate: float = 0.1,
                      seed: int = 0) -> Path:
    """Write a Pick-a-Pic-schema parquet (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) of photo pairs.

    Args:
        pairs_per_photo: random square crops per photograph (each crop gives one pair).
        size: side of the stored JPEGs in pixels (the recipe's ``data.resolution`` may be smaller).
        tie_rate: fraction of pairs stored as ties (``label_0 = 0.5``), which training drops.
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for name, caption in PHOTOS:
        photo = Image.open(_photo_path(name)).convert("RGB")
        w, h = photo.size
        for _ in range(pairs_per_photo):
            side = int(min(w, h) * rng.uniform(0.5, 1.0))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
            if rng.random() < tie_rate:
                first, second, label = _degrade(crop, rng), _degrade(crop, rng), 0.5
            elif rng.random() < 0.5:
                first, second, label = crop, _degrade(crop, rng), 1.0
            else:
                first, second, label = _degrade(crop, rng), crop, 0.0
            rows["caption"].append(caption)
            rows["jpg_0"].append(_jpeg(first))
            rows["jpg_1"].append(_jpeg(second))
            rows["label_0"].append(label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def train_and_evaluate(recipe: str | Path | None = None, overrides: list[str] = (),
                       seeds_per_prompt: int = 40, num_threads: int | None = DEMO_NUM_THREADS,
                       progress: bool = True, world: str = DEFAULT_WORLD) -> tuple[object, dict]:
    """Train a recipe on a committed digits world, then evaluate it against the base model on held-out seeds
    (10 digit prompts × ``seeds_per_prompt``) and the held-out preference pairs. Returns ``(TrainResult, report)``;
    the report is :func:`lora_dpo.evaluation.run.evaluate_run`'s plus ``train_time_s`` and ``torch_threads``.

    Args:
        recipe: the recipe (default: the world's ``lora_dpo.yaml``); its model and data are the world's.
        num_threads: torch intra-op threads for training and evaluation (:func:`torch_threads`; None: torch's
            default, one per core); default :data:`DEMO_NUM_THREADS`.
        progress: the evaluation's progress bar over its comparisons.
        world: ``digits`` (SD1.5 layout) or ``digits-sd3`` (:data:`lora_dpo.world.worlds.WORLDS`).
    Raises:
        FileNotFoundError: the world is missing (the message names the command that rebuilds it).
        ValueError: an unknown ``world``; ``num_threads`` < 1.
    """
    spec = get_world(world)
    spec.check()
    with torch_threads(num_threads) as threads:
        log.info("demo: %d torch thread(s)", threads)
        result, report = _train_and_evaluate(spec, recipe or spec.recipe("lora_dpo"), overrides, seeds_per_prompt,
                                             progress)
        report["torch_threads"] = threads
    return result, report


def iterate_demo(rounds: int, overrides: list[str] = (), num_threads: int | None = DEMO_NUM_THREADS,
                 progress: bool = True, world: str = DEFAULT_WORLD) -> IterateResult:
    """``lora-dpo demo --rounds R``: the world's ``iterate.yaml`` on a committed digits world, ``rounds`` rounds of
    online DPO (:func:`lora_dpo.iterate.loop.iterate`: best-worst pairs of 8 of the policy's own samples, each round
    against the previous one), each evaluated against the base and the previous round. Started again, it resumes
    (a finished run prints its table at once).

    Args:
        num_threads: torch intra-op threads for the whole run (``train.num_threads``; None: torch's default).
        world: as :func:`train_and_evaluate`.
    Raises:
        FileNotFoundError: the world is missing. ValueError: ``rounds`` < 1; an unknown ``world``.
    """
    if rounds < 1:
        raise ValueError(f"--rounds {rounds}: give at least 1 round")
    spec = get_world(world)
    spec.check()
    cfg = load_config(spec.recipe("iterate"), [
        f"model.pretrained_model_name_or_path={spec.pipeline}", f"iterate.scorer=[{spec.scorer}]",
        f"iterate.heldout_pairs={spec.prefs('heldout')}", f"iterate.rounds={rounds}",
        f"train.num_threads={'null' if num_threads is None else num_threads}", *overrides])
    return iterate(cfg, progress=progress)


def _train_and_evaluate(world, recipe: str | Path, overrides: list[str], seeds_per_prompt: int,
                        progress: bool) -> tuple[object, dict]:
    """:func:`train_and_evaluate`'s work on ``world`` (a :class:`~lora_dpo.world.worlds.World`), in the thread
    count it set."""
    cfg = load_config(recipe, [f"model.pretrained_model_name_or_path={world.pipeline}",
                               f"data.dataset={world.prefs('train')}", *overrides])
    started = time.perf_counter()
    result = train(cfg)
    train_time_s = time.perf_counter() - started
    reset_accelerate_state()  # a later train() in this process starts afresh
    log.info("evaluating %s against the base model", result.run_dir)
    report = evaluate_run(
        result.run_dir, scorer_spec=str(world.scorer), prompts=load_prompts("digits"),
        seeds_per_prompt=seeds_per_prompt, heldout_pairs=str(world.prefs("heldout")),
        implicit_draws=DEMO_IMPLICIT_DRAWS, progress=progress,
    )
    report["train_time_s"] = train_time_s
    return result, report

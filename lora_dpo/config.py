"""The typed recipe config: YAML recipe + ``key=value`` overrides -> a validated :class:`RecipeConfig`.

A recipe is a diff against the defaults below. Every section forbids unknown keys; errors name the key
(``optim.lr``) and, for a typo, the nearest valid key or value. Nothing here touches model weights, so
``lora-dpo validate`` and ``lora-dpo train`` fail within a second on a bad recipe.
"""

from __future__ import annotations

import codecs
import difflib
import glob
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_dpo.errors import ConfigError
from lora_dpo.losses import LOSSES, LossType, describe, refused_option

LOSS_TYPES = tuple(LOSSES)  # the allowed loss.type values, in the table's order


def _is_sequence(annotation: Any) -> bool:
    """Whether a field's annotation is a list or a tuple of any length (or an optional one); a fixed-length
    tuple such as ``tuple[str, str]`` is not (one value there is an error that names the key)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(arg) for arg in args if arg is not type(None))
    return origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _one_item_list(cls, value: Any, info) -> Any:
        """A single value where a list is due is a one-item list: ``lora.target_modules=to_q`` is ``[to_q]``."""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and info.field_name \
                and _is_sequence(cls.model_fields[info.field_name].annotation):
            return [value]
        return value


class ModelConfig(_Section):
    """Which base pipeline to align; its family (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1) is read from the folder's
    ``model_index.json`` (:mod:`lora_dpo.models.families`). The keys after ``vae_dtype`` apply to the flow-matching
    families only; the UNet families refuse them."""

    pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None
    variant: str | None = None
    # Overrides the scheduler config's prediction type; None keeps the model's own.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    # dtype of the frozen VAE; "auto" = the weight dtype, except fp32 for SDXL under fp16 (its VAE overflows).
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # The σ density of a flow model's training draws, by diffusers' training-script names (None: logit_normal with
    # logit_mean 0, logit_std 1; mode with mode_scale 1.29), shifted as the model's scheduler shifts.
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] | None = None
    logit_mean: float | None = None
    logit_std: float | None = Field(None, gt=0)
    mode_scale: float | None = None
    # The frozen transformer in 4-bit NF4 or 8-bit (bitsandbytes); LoRA trains in fp32 on top (LoRA mode only).
    quantization: Literal["nf4", "int8"] | None = None
    # FLUX.1-dev's distilled guidance input during training (None: 3.5); ignored by models without it.
    guidance_scale: float | None = Field(None, ge=0)


class LoraConfig(_Section):
    """PEFT ``LoraConfig`` fields (names as in PEFT). ``lora_dropout`` stays 0: dropout makes the policy
    differ from the disabled-adapter reference at step 0 (the step-0 loss would not be ln 2)."""

    r: int = Field(8, gt=0)
    lora_alpha: float = Field(8.0, gt=0)
    # None: the family's default (UNets: to_q, to_k, to_v, to_out.0; SD3 adds the caption stream's projections;
    # FLUX also its feed-forward and single-block MLP layers: lora_dpo.models.families.*.default_target_modules).
    target_modules: list[str] | None = None
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Start from an existing LoRA (a run folder or a .safetensors file: diffusers, PEFT or kohya layout) instead of
    # a fresh one. The policy starts from it and the reference IS it (a frozen second adapter), so step-0 loss is
    # ln 2 as with a fresh adapter. Its own rank, alpha and target modules are used; r, lora_alpha, target_modules
    # and lora_dropout above are then ignored.
    init_from: str | None = None


class DataConfig(_Section):
    """Preference pairs in the Pick-a-Pic schema (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``).

    ``dataset`` is a hub id (``yuvalkirstain/pickapic_v2``), a .parquet/.arrow/.json/.jsonl/.csv file, a glob
    of such files (``/data/pickapic/train-*.parquet``), a folder of them (hub-style shards
    ``SPLIT-00000-of-00009.*`` are picked by ``split``), a ``Dataset.save_to_disk`` folder, or a folder of
    ``w/`` and ``l/`` image subfolders with matching file names plus a ``metadata.jsonl`` (``{"file_name":
    ..., "caption": ...}`` per pair). A table of ``preferred``/``rejected`` image columns (e.g. a CSV
    ``caption,preferred,rejected``) needs no label. See :func:`lora_dpo.data.sources.load_preference_dataset`.
    """

    dataset: str = "yuvalkirstain/pickapic_v2"
    split: str = "train"
    caption_column: str = "caption"
    image_columns: tuple[str, str] = ("jpg_0", "jpg_1")
    # 1: the first image column is preferred, 0: the second, 0.5: a tie. null: the first image column always
    # holds the preferred image (tables of preferred/rejected pairs).
    label_column: str | None = "label_0"
    # Folder that relative image paths in the image columns are resolved against (default: the data file's
    # folder). A name that is not a file is also tried with .jpg/.jpeg/.png/.webp/.bmp/.gif/.tif/.tiff
    # appended, so Pick-a-Pic's uids work: pickapic_v2_no_images -> image_columns=[image_0_uid, image_1_uid],
    # image_root=<folder of the images>. When set, no image file outside it is read: a path whose real path
    # leaves it (`..`, an absolute path, `~`, a symlinked file or folder pointing elsewhere) skips its row
    # (`image_outside_root`).
    image_root: str | None = None
    # Text encoding of CSV / JSON / JSONL data files (and a w/ + l/ folder's metadata.jsonl), any Python codec
    # name: e.g. latin-1 or cp1252 for files written by spreadsheet programs. A file that does not decode stops
    # with the byte and its position.
    encoding: str = "utf-8"
    resolution: int = Field(512, gt=0)
    random_crop: bool = False
    random_flip: bool = True
    # Probability of training a pair on the empty caption (shared by both images of the pair).
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Ties (label_0 == 0.5) carry no preference; the only supported handling is dropping them.
    drop_ties: bool = True
    # Keep only pairs whose scorer rewards differ by at least this much (needs data.score_columns, as written by
    # `lora-dpo prefs`); pairs of two equally good (or bad) images carry little preference signal.
    min_score_gap: float | None = Field(None, ge=0)
    score_columns: tuple[str, str] = ("score_0", "score_1")
    # Pick-a-Pic's boolean column: rows where it is false (the two images are not different) are dropped
    # (`not_different`). Ignored when the data set has no such column (an explicitly set name must exist);
    # null: no such filter.
    are_different_column: str | None = "are_different"
    # Drop a row whose (caption, preferred image bytes, rejected image bytes) repeats an earlier kept row
    # (`duplicate`; the first one is kept), and a row whose two images are byte-identical
    # (`identical_images`). Both hash every image (sha1) at load time: image files are then read in full, not
    # only their headers.
    drop_duplicates: bool = False
    drop_identical_images: bool = False
    max_pairs: int | None = Field(None, gt=0)
    # Processes for the load-time checks (datasets.map num_proc); None: in this process. Not used when
    # streaming.
    num_proc: int | None = Field(None, gt=0)
    num_workers: int = Field(0, ge=0)
    # Read the data as a stream (datasets IterableDataset, `load_dataset(..., streaming=True)`) instead of
    # loading it whole, for sets that do not fit on disk: checks run on the fly, pairs come from
    # lora_dpo.data.loader.StreamedPairs.
    streaming: bool = False
    # Streaming only: rows in the shuffle buffer (IterableDataset.shuffle; shard order is shuffled too). 0:
    # stored order. Rows in the buffer at a checkpoint are not seen again after resuming (datasets' documented
    # limit).
    shuffle_buffer: int = Field(1000, ge=0)
    cache_dir: str | None = None
    # A folder written by `lora-dpo cache`: VAE latents and text embeddings (and, if built with them, the reference
    # errors of fixed draws) instead of images; training then loads neither the VAE nor the text encoders.
    latent_cache: str | None = None
    # Unpaired data (Diffusion-KTO, loss.type=kto): one image per row, with a binary label (true / 1: desirable,
    # false / 0: undesirable) in desirable_column, TRL's KTO convention. The image column holds what image_columns
    # hold in a pair set (bytes, datasets images, paths or uids). Same sources and load-time checks as pairs;
    # not with data.streaming or data.latent_cache.
    unpaired: bool = False
    image_column: str = "image"
    desirable_column: str = "label"

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"data.encoding='{value}' is not a text encoding Python knows; set it to e.g. utf-8, "
                             "latin-1 or cp1252") from None
        return value

    @property
    def row_image_columns(self) -> tuple[str, ...]:
        """The image columns of one row: ``(image_column,)`` for unpaired data, else ``image_columns``."""
        return (self.image_column,) if self.unpaired else tuple(self.image_columns)

    @property
    def row_label_column(self) -> str | None:
        """The label column of one row: ``desirable_column`` for unpaired data, else ``label_column``."""
        return self.desirable_column if self.unpaired else self.label_column

    @model_validator(mode="after")
    def _unpaired_options(self) -> DataConfig:
        if self.unpaired:
            paired_only = [name for name, on in (("data.min_score_gap", self.min_score_gap is not None),
                                                 ("data.drop_identical_images", self.drop_identical_images),
                                                 ("data.streaming", self.streaming),
                                                 ("data.latent_cache", self.latent_cache is not None)) if on]
            if paired_only:
                verb = "does" if len(paired_only) == 1 else "do"
                raise ValueError(f"{', '.join(paired_only)} {verb} not apply to unpaired data (data.unpaired=true): "
                                 "remove it, or give a pair set")
        return self


class ReferenceConfig(_Section):
    """The frozen reference of full fine-tuning (``train.mode: full``): a copy of the base UNet.

    In LoRA mode the reference is the UNet with its adapter disabled and costs no memory; these keys then must
    stay at their defaults. ``dtype: auto`` is fp32, the dtype of the policy's master weights: the copy then runs
    under the same autocast as the policy and computes exactly what the untrained policy computes (u = 0 at step
    0). ``bfloat16``/``float16`` halve the copy's memory, but the rounded weights put a noise floor under every
    implicit reward: on the digits world at β 5000, step-0 loss ln 2 + 0.09 (bf16 copy, fp32 policy) and ln 2 + 0.19
    (bf16 copy, bf16 autocast policy), accuracy ~0.5 instead of 0 (README, "Full fine-tuning").
    ``offload: true`` keeps the copy in CPU memory and streams each layer's weights to the GPU for the reference
    forward (accelerate's ``cpu_offload``): less GPU memory, more step time."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    offload: bool = False


class LossConfig(_Section):
    """The preference loss (:mod:`lora_dpo.losses`; its table :data:`lora_dpo.losses.LOSSES` declares each type).

    - ``sigmoid`` (default): Diffusion-DPO, ``u = -0.5·β·[(e_θ(w)-e_ref(w)) - (e_θ(l)-e_ref(l))]``,
      ``-log σ(u)`` (Wallace et al. 2023, Eq. 14). β follows the official code's convention (errors averaged over
      C,H,W; factor 0.5): 5000. The diffusers research script's β=2500 without the 0.5 is the same loss. ``label_smoothing`` ε
      gives conservative DPO; ``sdpo_mu`` μ turns on the Diffusion-SDPO safeguard (the rejected images' gradient
      scaled so that the preferred images' error cannot rise; the paper's launchers: 0.9 SD1.5, 0.6 SDXL).
    - ``ipo``: ``(h - 1/(2β))²`` on the same implicit log-ratio h = u/β; ``hinge``: ``max(0, 1 - u)``.
    - ``mapo``: reference-free (no reference pass at all), ``mapo_beta`` 0.1 and ``mapo_alpha`` 0.5 as the paper.
    - ``kto``: Diffusion-KTO on labeled images (``data.unpaired``; a pair set is read as its preferred images,
      desirable, and its rejected ones, undesirable), each image its own noise and t. ``kto_beta`` 1000 (the official
      code's, with no 0.5), ``desirable_weight`` / ``undesirable_weight`` λ_D / λ_U (TRL's names) 1.0.
      ``train.batch_size`` counts images.
    - ``sft``: the plain denoising loss on the preferred images only (the paper's baseline; no reference pass).
    - ``sft_weight`` w adds the anchor ``w·e_θ(w)`` to any preference loss (KTO: on its desirable images).
    """

    type: Literal[LOSS_TYPES] = "sigmoid"
    beta: float = Field(5000.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    sdpo_mu: float | None = Field(None, ge=0.0, lt=1.0)
    mapo_beta: float = Field(0.1, gt=0)
    mapo_alpha: float = Field(0.5, gt=0)
    kto_beta: float = Field(1000.0, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    sft_weight: float = Field(0.0, ge=0.0)

    def _is_set(self, key: str) -> bool:
        return getattr(self, key) != type(self).model_fields[key].default

    @model_validator(mode="after")
    def _options_fit_the_type(self) -> LossConfig:
        message = refused_option(self.type, self._is_set)  # lora_dpo.losses.REFUSALS
        if message:
            raise ValueError(message)
        return self

    @property
    def spec(self) -> LossType:
        """This type's row of :data:`lora_dpo.losses.LOSSES`."""
        return LOSSES[self.type]

    def describe(self) -> str:
        """The loss and the hyperparameters it uses, e.g. ``sigmoid (β 5000, SDPO μ 0.6)``, ``mapo (β 0.1, α 0.5)``."""
        return describe(self.type, lambda key: getattr(self, key), self._is_set)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares against a reference (a reference pass, or precomputed reference errors)."""
        return self.spec.needs_reference

    @property
    def unit(self) -> str:
        """What ``train.batch_size`` counts for this loss: ``"pairs"`` or ``"images"`` (labeled images, KTO)."""
        return self.spec.unit


class OptimConfig(_Section):
    """``adamw`` (torch), ``adamw8bit`` (bitsandbytes), or ``adafactor`` (transformers, with
    ``scale_parameter=False, relative_step=False`` as the official SDXL runs: ``lr`` is used as given; ``betas`` and
    ``eps`` do not apply to it)."""

    name: Literal["adamw", "adamw8bit", "adafactor"] = "adamw8bit"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)


# Other spellings of train.mixed_precision's values.
_PRECISION_ALIASES = {"fp32": "no", "float32": "no", "float16": "fp16", "bfloat16": "bf16"}


class TrainConfig(_Section):
    # lora: the policy is the base UNet + a LoRA adapter, the reference is the adapter disabled (one UNet in
    # memory). full: the whole UNet is trained (fp32 master weights) against a frozen copy (see `reference`).
    mode: Literal["lora", "full"] = "lora"
    max_steps: int = Field(2000, gt=0)
    # Pairs per device per micro-step; effective batch = batch_size × gradient_accumulation_steps × processes.
    batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    seed: int = 0
    # no (fp32; also written fp32 or float32), fp16 (needs a GPU), bf16.
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(500, gt=0)
    # Number of checkpoints kept in output.dir/checkpoints (oldest deleted first); None keeps all.
    checkpoints_total_limit: int | None = Field(3, gt=0)
    # "latest" (the newest checkpoint of output.dir) or a path to a checkpoints/step_N folder. A resumed run
    # continues its folder: output.overwrite is then ignored.
    resume_from: str | None = None
    log_every: int = Field(1, gt=0)
    allow_tf32: bool = True
    # A step whose gradient norm is NaN/Inf is skipped (no optimizer step, as fp16's loss scaler does); this many in
    # a row stop the run (exit 1), its checkpoints kept. Under fp16 the loss scaler skips an overflow and halves its
    # scale; only overflows at a scale <= 1 (NaN/Inf gradients unscaled) count.
    stop_after_nonfinite_grads: int = Field(5, gt=0)
    # torch's intra-op threads for the run (restored after it); None = torch's default (one per core). Small models
    # (the digits world) run best on 1: their many small ops collapse on 2 threads beside another busy process
    # (benchmarks/demo_threads.py).
    num_threads: int | None = Field(None, ge=1)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        """`mixed_precision: no` in YAML 1.1 is the boolean False; fp32 / float32 (full precision) also mean no,
        and float16 / bfloat16 mean fp16 / bf16."""
        if value is False:
            return "no"
        return _PRECISION_ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else value


class OutputConfig(_Section):
    # Run folder; None = adapters/<run_name>.
    dir: str | None = None
    run_name: str = "lora-dpo"
    # Starting a fresh run in a folder that holds checkpoints needs this (or train.resume_from).
    overwrite: bool = False
    tensorboard: bool = True


class IterateConfig(_Section):
    """``lora-dpo iterate``: rounds of online Diffusion-DPO. Round r samples ``candidates`` images per prompt and group
    from the current policy (the base plus round r−1's adapter), scores them, pairs them by ``pairing``, trains the
    recipe on those pairs with round r−1's policy as the reference (``lora.init_from``), and evaluates it against
    the base and against round r−1. Ignored by ``train``."""

    rounds: int = Field(3, ge=1)
    candidates: int = Field(8, ge=2)  # N images per group
    # Groups of N per prompt and round (group j of round r: seeds seed_offset + ((r-1)·groups + j)·N + i).
    groups_per_prompt: int = Field(100, ge=1)
    pairing: Literal["best-worst", "top-bottom-k", "all", "adjacent"] = "best-worst"
    top_k: int = Field(1, ge=1)  # pairs per group for top-bottom-k (k <= N/2)
    min_gap: float = Field(0.0, ge=0)  # the smallest score gap of a pair
    prompts: str = "digits"  # 'digits', a text file (one per line) or a table (.csv/.tsv/.jsonl/.json/.parquet)
    prompt_column: str | None = None
    # Scorer specs (lora-dpo prefs --scorer): 'jpeg', or a folder (digit classifier, aesthetic, CLIP / PickScore);
    # several combine by `vote`. The first one judges the evaluations.
    scorer: list[str] = Field(default_factory=list)
    vote: Literal["mean-rank", "majority"] = "mean-rank"
    num_inference_steps: int = Field(20, gt=0)
    guidance_scale: float | None = Field(None, ge=0)  # None: model.guidance_scale, else 3.0
    sample_batch_size: int = Field(64, gt=0)  # images per pipeline call and per scorer pass
    seed_offset: int = Field(0, ge=0)
    # The evaluation of every round: the same prompts (None: `prompts`) and seeds, and the same held-out pairs.
    eval_prompts: str | None = None
    eval_seeds_per_prompt: int = Field(40, gt=0)
    eval_seed_offset: int = Field(10_000, ge=0)
    heldout_pairs: str | None = None
    implicit_draws: int = Field(256, gt=0)  # draws per held-out pair (lora-dpo eval's default: its error < 0.01)

    @property
    def seeds_per_round(self) -> int:
        """The seeds one round's candidates take per prompt."""
        return self.groups_per_prompt * self.candidates

    @model_validator(mode="after")
    def _fits(self) -> IterateConfig:
        if self.pairing == "top-bottom-k" and self.top_k > self.candidates // 2:
            raise ValueError(f"iterate.top_k={self.top_k} needs k <= candidates / 2 = {self.candidates // 2} (the k "
                             "best against the k worst of each group); lower top_k or raise candidates")
        train = (self.seed_offset, self.seed_offset + self.rounds * self.seeds_per_round)
        held = (self.eval_seed_offset, self.eval_seed_offset + self.eval_seeds_per_prompt)
        if train[0] < held[1] and held[0] < train[1]:
            raise ValueError(f"the candidates' seeds [{train[0]}, {train[1]}) of {self.rounds} rounds overlap the "
                             f"evaluation's seeds [{held[0]}, {held[1]}): the evaluation would see training noise; "
                             f"set iterate.eval_seed_offset >= {train[1]} or lower iterate.groups_per_prompt")
        return self


class RecipeConfig(_Section):
    """The whole recipe. Section names match the YAML and the ``section.key=value`` overrides."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    iterate: IterateConfig = Field(default_factory=IterateConfig)

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RecipeConfig:
        if self.data.resolution % 8:
            raise ValueError(
                f"data.resolution={self.data.resolution} must be a multiple of 8 (the VAE downsamples by 8); "
                f"try data.resolution={max(8, round(self.data.resolution / 8) * 8)}"
            )
        if self.optim.lr_warmup_steps and self.optim.lr_scheduler == "constant":
            raise ValueError(
                "optim.lr_warmup_steps is set but optim.lr_scheduler=constant ignores it; "
                "use optim.lr_scheduler=constant_with_warmup"
            )
        if self.train.mode == "lora" and self.reference != ReferenceConfig():
            raise ValueError(
                "reference.dtype / reference.offload apply to train.mode=full; in LoRA mode the reference is the UNet "
                "with its adapter disabled and costs no memory. Remove them or set train.mode=full"
            )
        if self.train.mode == "full" and self.lora.init_from:
            raise ValueError(
                "lora.init_from applies to train.mode=lora. To fine-tune the whole UNet from a LoRA, merge it first "
                "(lora-dpo merge BASE LORA OUT) and set model.pretrained_model_name_or_path=OUT"
            )
        image_losses = "/".join(name for name, row in LOSSES.items() if row.unit == "images")
        if self.data.unpaired and self.loss.unit != "images":
            raise ValueError(f"data.unpaired=true (one labeled image per row) trains loss.type={image_losses} only, "
                             f"not {self.loss.type}: set loss.type={image_losses}, or give a pair set")
        if self.loss.unit == "images" and (self.data.latent_cache or self.data.streaming):
            raise ValueError(f"loss.type={self.loss.type} reads its images from a map-style data set: "
                             "data.latent_cache and data.streaming are not supported with it yet; remove them")
        return self

    def notes(self) -> list[str]:
        """What the command line prints before it runs this recipe, one line each (``warning: ...`` or
        ``note: ...``): settings that are valid but may not be what was meant."""
        lines = []
        if self.optim.lr_warmup_steps > self.train.max_steps:
            lines.append(f"warning: optim.lr_warmup_steps={self.optim.lr_warmup_steps} exceeds train.max_steps="
                         f"{self.train.max_steps}: the learning rate never reaches optim.lr={self.optim.lr:g} in this "
                         f"run (fine for a short test; lower optim.lr_warmup_steps for a real run)")
        if self.train.resume_from is not None and self.output.overwrite:
            lines.append(f"note: train.resume_from={self.train.resume_from} continues the run in its folder; "
                         "output.overwrite=true is ignored")
        return lines

    @property
    def run_dir(self) -> Path:
        """The run folder: ``output.dir`` or ``adapters/<output.run_name>``."""
        return Path(self.output.dir) if self.output.dir else Path("adapters") / self.output.run_name

    def to_yaml(self) -> str:
        """The resolved recipe, every key spelled out, as YAML that :func:`load_config` reads back."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _fields_at(path: tuple[str, ...]) -> list[str]:
    """Valid keys at a dotted location, for did-you-mean suggestions."""
    model: type[BaseModel] = RecipeConfig
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _suggest(word: str, choices: list[str], prefix: tuple[str, ...] = ()) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{'.'.join((*prefix, close[0]))}'?"
    return f"; valid keys: {', '.join(choices)}" if choices else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe ({source}):"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = _suggest(loc[-1], _fields_at(loc[:-1]), loc[:-1])
            lines.append(f"  - unknown key '{key}'{hint}")
        elif e["type"] == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",") if c.strip(" '")]
            close = difflib.get_close_matches(str(e.get("input")), choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - {key}={e.get('input')!r}: must be one of {expected}{hint}")
        elif e["type"] == "value_error":
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {key}={e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``section.key=value`` override; the value is read as YAML (``1e-5``, ``true``, ``[a, b]``).

    Raises:
        ConfigError: the item has no ``=`` or no dotted key, or its value is not YAML.
    """
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        sections = list(RecipeConfig.model_fields)
        raise ConfigError(
            f"override key '{key}' must name a section and a key, e.g. train.{key or 'max_steps'}=...; "
            f"sections: {', '.join(sections)}"
        )
    raw = raw.strip()
    if raw.lower() in _YAML11_BOOLS:  # keep yes/no/on/off as text: pydantic reads them as bools where a bool is due
        return parts, raw
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"override '{item}': the value is not valid YAML ({problem}); quote it for the shell, e.g. "
            f"'{key}=\"{raw}\"' for a text, or write a list as [a, b]"
        ) from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; let pydantic coerce numbers
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b=value`` override into the nested dict ``data`` (in place) and return it."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


# Top-level keys of an accelerate launcher config (``accelerate config`` / ``--config_file``), never of a recipe.
_LAUNCHER_KEYS = {"compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank",
                  "main_training_function", "deepspeed_config", "fsdp_config", "use_cpu", "gpu_ids", "rdzv_backend"}
# Recipe keys that name an existing input (a folder, a file or a glob), resolved by :func:`_resolve_recipe_paths`.
_INPUT_PATHS = (("model", "pretrained_model_name_or_path"), ("data", "dataset"), ("data", "image_root"),
                ("data", "latent_cache"), ("lora", "init_from"), ("iterate", "prompts"), ("iterate", "eval_prompts"),
                ("iterate", "scorer"), ("iterate", "heldout_pairs"))


def _exists(path: Path) -> bool:
    return bool(glob.glob(str(path))) if glob.has_magic(str(path)) else path.exists()


def _resolve_recipe_paths(data: dict[str, Any], recipe: Path) -> None:
    """Make the relative input paths written in a recipe file (:data:`_INPUT_PATHS`) that do not exist from the
    current directory absolute, read from the recipe's folder or the nearest folder above it where they exist
    (a shipped recipe's ``worlds/digits/pipeline`` is the repository's, from any directory). Anything else, a hub
    id included, is left as written."""
    for section, key in _INPUT_PATHS:
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, list):  # a list of inputs (iterate.scorer)
            node[key] = [_resolved(item, recipe) for item in value]
        elif isinstance(value, str):
            node[key] = _resolved(value, recipe)


# Values of input keys that name a built-in, never a path: the digits world's prompts, the JPEG scorer.
_BUILT_INS = {"digits", "jpeg"}


def _resolved(value: Any, recipe: Path) -> Any:
    """One input path of a recipe file, as :func:`_resolve_recipe_paths` reads it (anything else unchanged)."""
    if not isinstance(value, str) or not value or value in _BUILT_INS or value.startswith("~") \
            or Path(value).is_absolute() or _exists(Path(value)):
        return value
    for folder in recipe.resolve().parents:
        if _exists(folder / value):
            return str(folder / value)
    return value


def _read_recipe(recipe: str | Path) -> dict[str, Any]:
    """The recipe file's sections as a dict, its relative input paths resolved (:func:`_resolve_recipe_paths`).

    Raises:
        ConfigError: no such file, not YAML, not a mapping, or an accelerate launcher config given as a recipe.
    """
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe '{recipe}' not found; recipes ship under recipes/ (e.g. recipes/sd15/lora_dpo.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe '{recipe}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{recipe}' must be a mapping of sections (model:, lora:, data:, ...)")
    if _LAUNCHER_KEYS & set(data) and not set(data) & set(RecipeConfig.model_fields):
        raise ConfigError(
            f"'{recipe}' is an accelerate launcher config, not a recipe: use it with `accelerate launch "
            f"--config_file {recipe} -m lora_dpo.cli train RECIPE` (a recipe such as recipes/sd15/lora_dpo.yaml)"
        )
    _resolve_recipe_paths(data, path)
    return data


def load_config(recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Read a recipe YAML (or only the defaults when ``recipe`` is None), apply overrides, validate.

    Relative paths: an input path written in the recipe file (model folder, data set, image root, latent cache,
    starting LoRA) is read from the current directory when it exists there, else from the recipe's folder or the
    nearest folder above it where it exists, so a shipped recipe works from any directory. Paths given as
    overrides, and ``output.dir``, are read from the current directory.

    Raises:
        ConfigError: missing file, YAML syntax error, an accelerate launcher config instead of a recipe, unknown key
            (with the nearest valid one), wrong type or value, or an impossible combination. Raised before anything
            loads model weights.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if recipe is not None:
        data = _read_recipe(recipe)
        source = str(recipe)
    apply_overrides(data, list(overrides))
    if overrides:
        source += " + overrides"
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None

"""What a run exports: a LoRA adapter (``pytorch_lora_weights.safetensors`` in the diffusers format, with the LoRA
metadata ``r``, ``lora_alpha``, ``target_modules`` that ``pipe.load_lora_weights`` reads) or, for full
fine-tuning, a whole diffusers pipeline folder; and a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCardData
from peft.utils import get_peft_model_state_dict

from lora_dpo.models.adapters import ADAPTER_NAME
from lora_dpo.models.families import get_family, pipeline_class
from lora_dpo.models.lora_files import (
    FAMILY_KEY,
    WEIGHT_NAME,
    match_output_mode,
    read_lora_file,
    save_safetensors,
)
from lora_dpo.models.pretrained import is_hub_id


def save_lora_adapter(save_dir: str | Path, unet: torch.nn.Module, family: str,
                      full_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the denoiser's ``default`` adapter as ``<save_dir>/pytorch_lora_weights.safetensors`` (its weights taken
    from ``full_state``, the denoiser's whole gathered state dict, when given).

    ``unet``: the denoiser (``UNet2DConditionModel``, or the SD3 / FLUX transformer) holding the adapter. Keys are
    ``<denoiser_name>.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT names under diffusers' ``unet.`` or
    ``transformer.`` prefix); the safetensors header carries the PEFT ``LoraConfig`` (rank, alpha, target modules,
    patterns) under diffusers' key ``lora_adapter_metadata`` (``transformer.r``, ...), so loaders do not fall back to
    alpha = r, and the family's registry name under ``lora_dpo.family``
    (:data:`lora_dpo.models.lora_files.FAMILY_KEY`), so an adapter loaded onto a model of another family fails with a
    message naming both (:func:`lora_dpo.models.lora_files.check_adapter_fits`), even where the shapes agree (the
    tiny SD3 and FLUX transformers). The keys are deliberately not passed through ``convert_state_dict_to_diffusers``:
    it renames only the attention projections (``.lora.down.weight``) and leaves other modules in PEFT names, and
    diffusers' loader decides from the first key alone whether to convert, so an adapter on attention and, e.g.,
    ``proj_in`` would silently lose its attention weights on ``load_lora_weights``. ``family``: the registry name
    (:mod:`lora_dpo.models.families`), whose pipeline class writes the file. The file gets the mode of a plain new
    file (``0o666`` less the umask: :func:`lora_dpo.models.lora_files.match_output_mode`).
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet, state_dict=full_state, adapter_name=ADAPTER_NAME)
    layers = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    get_family(family).save_lora_weights(save_dir, layers, metadata, WEIGHT_NAME)
    # diffusers writes the file and its header; add the family to that header, keeping the rest as written
    tensors, header = read_lora_file(save_dir / WEIGHT_NAME)
    return save_safetensors(tensors, save_dir / WEIGHT_NAME, {**header, FAMILY_KEY: get_family(family).name})


def save_full_pipeline(save_dir: str | Path, unet: torch.nn.Module, model_cfg, family: str) -> Path:
    """Write a complete diffusers pipeline into ``save_dir``: the tuned UNet (fp32) and the base's other parts.

    The VAE, text encoder(s), tokenizer(s), scheduler (and SD1.5's safety checker, if the base has one) are
    re-read from ``model_cfg.pretrained_model_name_or_path`` in fp32, not taken from training, where they may
    sit in half precision. The family's pipeline class (``StableDiffusionPipeline.from_pretrained(save_dir)``, or
    the SDXL class) opens the result. Its files get the mode of a plain new file (``0o666`` less the umask), not
    safetensors' ``0600``. Returns the path of ``model_index.json``.
    """
    cls = pipeline_class(family)
    denoiser = {get_family(family).denoiser_name: unet}  # unet= / transformer=: the tuned one replaces the base's
    pipe = cls.from_pretrained(model_cfg.pretrained_model_name_or_path, **denoiser, revision=model_cfg.revision,
                               variant=model_cfg.variant, use_safetensors=True)
    pipe.save_pretrained(save_dir, safe_serialization=True)
    save_dir = Path(save_dir)  # what save_pretrained wrote: the index and one folder per component
    match_output_mode(save_dir / "model_index.json", *(save_dir / name for name, part in pipe.components.items()
                                                        if part is not None))
    return save_dir / "model_index.json"


def export_policy(policy, run_dir: str | Path, cfg, family: str,
                  full_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Export a trained :class:`lora_dpo.models.policy.Policy` into ``run_dir``: the small artifact other tools open;
    returns its path.

    LoRA (``policy.mode == "lora"``): ``pytorch_lora_weights.safetensors`` (:func:`save_lora_adapter`;
    ``pipe.load_lora_weights(run_dir)``). Full: a complete diffusers pipeline folder (:func:`save_full_pipeline`:
    ``model_index.json``, ``unet/`` with the tuned fp32 weights, and the base's other components), which
    ``DiffusionPipeline.from_pretrained(run_dir)`` opens.

    Args:
        cfg: the recipe (``cfg.model`` names the base whose other components a full pipeline takes).
        full_state: the UNet's whole state dict as ``Accelerator.get_state_dict`` gathers it (FSDP / DeepSpeed runs),
            written instead of the module's own weights; None reads the module.
    """
    if policy.mode == "lora":
        return save_lora_adapter(run_dir, policy.unet, family, full_state)
    unet = policy.unet
    if full_state is not None:  # a whole fp32 UNet to hand to the pipeline
        unet = type(policy.unet).from_config(policy.unet.config)
        unet.load_state_dict({k: v.float() for k, v in full_state.items()}, strict=True)
    return save_full_pipeline(run_dir, unet, cfg.model, family)


# Licenses of the well-known bases; a model derived from them inherits theirs. Anything else: "other".
BASE_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}


def card_base_model(model: str | Path) -> str:
    """How every model card names its base model: a hub id as written, a local folder as its absolute path
    (``~`` expanded, ``..`` removed, symbolic links kept), so the run's card and a merged model's card agree
    whichever directory the command ran from."""
    model = str(model)
    return model if is_hub_id(model) else os.path.abspath(os.path.expanduser(model))


def card_prompt(caption: str | None, call_kwargs: dict[str, Any] | None = None) -> str:
    """The example line of a card's usage snippet: ``image = pipe(<caption>).images[0]`` with a caption of the run's
    own training data (a Python string literal), or, when none is known, a ``prompt`` placeholder with a comment
    saying to use a caption like the training data's (never a stock prompt the model was not trained on).
    ``call_kwargs`` (e.g. ``{"max_sequence_length": 32}``) are written into the call after the prompt."""
    extra = "".join(f", {key}={value!r}" for key, value in (call_kwargs or {}).items())
    if caption and caption.strip():
        return f"image = pipe({json.dumps(caption.strip(), ensure_ascii=False)}{extra}).images[0]  # a training caption"
    return ('prompt = "..."  # write a caption in the style of the training data\n'
            f"image = pipe(prompt{extra}).images[0]")


def training_caption(dataset, caption_column: str = "caption") -> str | None:
    """The first caption a run trains on, for its model card (:func:`write_model_card`'s ``prompt``): the first
    kept row's of a :class:`lora_dpo.data.pairs.PairDataset` / :class:`lora_dpo.data.unpaired.LabeledImages`
    (their ``dataset``: the kept rows), the first distinct caption of a
    :class:`lora_dpo.data.cache.CachedPairDataset` (its ``texts``); None for a stream (``dataset`` None), an
    empty data set or anything else. Reads one row."""
    rows, column = getattr(dataset, "texts", None), "caption"
    if rows is None:
        rows, column = getattr(dataset, "dataset", None), caption_column
    if rows is None and hasattr(dataset, "column_names"):  # the kept rows themselves (a datasets.Dataset)
        rows = dataset
    if rows is None or column not in getattr(rows, "column_names", ()) or len(rows) == 0:
        return None
    caption = rows.select_columns([column])[0][column]
    return caption if isinstance(caption, str) and caption.strip() else None


def card_front_matter(base: str, family: str, relation: str, datasets: list[str] = ()) -> str:
    """The YAML front matter of a Hugging Face model card, between ``---`` lines (``huggingface_hub``'s writer).

    Args:
        base: the base model's hub id or folder (``base_model``, written as :func:`card_base_model` gives it: the
            Hub links a hub id to its base).
        family: the base's family (registry name): its tags (``stable-diffusion``, ``stable-diffusion-xl``).
        relation: ``adapter`` (a LoRA), ``merge`` (a LoRA fused into the base) or ``finetune`` (full fine-tune):
            the Hub's ``base_model_relation``.
        datasets: hub ids of the training data (local paths are left out).
    """
    tags = ["text-to-image", "diffusers", "diffusion-dpo", *get_family(family).model_card_tags]
    if relation == "adapter":
        tags.insert(2, "lora")
    data = ModelCardData(
        base_model=card_base_model(base), base_model_relation=relation, library_name="diffusers", pipeline_tag="text-to-image",
        license=BASE_LICENSES.get(base, "other"), tags=tags,
        datasets=[d for d in datasets if is_hub_id(d)] or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _never_moved_warning(final_metrics: dict[str, Any]) -> str:
    """A warning paragraph for the card when the trainable weights never moved (``diagnostics/weights_moved`` 0)."""
    if final_metrics.get("diagnostics/weights_moved", 1.0):
        return ""
    return ("\n**Warning: the trainable weights never moved during this run**: every optimizer step was skipped "
            "or changed nothing (see `grad_norm` in `metrics.jsonl`), so this is the starting model. Lower "
            "`loss.beta` or `optim.lr`, or check the data.\n")


def write_model_card(run_dir: str | Path, cfg, family: str, final_metrics: dict[str, Any], data_report: dict,
                     prompt: str | None = None, call_kwargs: dict[str, Any] | None = None) -> Path:
    """A Hugging Face model card ``README.md`` for the run folder: front matter (:func:`card_front_matter`), base
    model, data, recipe, final metrics, and how to load the result. Returns its path.

    The usage snippet prompts with ``prompt`` (a caption the run trained on: :func:`training_caption`), else the
    data report's ``example_caption``, else a placeholder (:func:`card_prompt`). The base model is named as
    :func:`card_base_model` gives it (a local folder: its absolute path). ``call_kwargs``: what the pipeline call
    needs besides the prompt to sample as the model trained (:meth:`ModelFamily.usage_kwargs`).
    """
    base = card_base_model(cfg.model.pretrained_model_name_or_path)
    cls = pipeline_class(family).__name__
    shown = {k: final_metrics[k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in final_metrics}
    if cfg.train.mode == "full":
        what = f"A fully fine-tuned UNet (a complete diffusers pipeline folder) from `{base}`"
        use = f"pipe = {cls}.from_pretrained(\"path/to/this/folder\")"
        relation, other = "finetune", ""
    else:
        what = f"A LoRA adapter (rank {cfg.lora.r}, alpha {cfg.lora.lora_alpha}) for `{base}`"
        if cfg.lora.init_from:
            what = (f"A LoRA adapter for `{base}`, DPO-tuned from the LoRA `{cfg.lora.init_from}` (its rank and "
                    "alpha; that LoRA was the reference, kept here as `reference_lora.safetensors`)")
        use = (f"pipe = {cls}.from_pretrained(\"{base}\")\npipe.load_lora_weights(\"path/to/this/folder\")\n"
               "# or fuse it into the base weights: pipe.fuse_lora(lora_scale=1.0)")
        relation = "adapter"
        other = ("\nOther tools: `lora-dpo export <this folder> --format kohya` writes the AUTOMATIC1111 / ComfyUI "
                 "layout, `--format peft` the PEFT layout; `lora-dpo merge` fuses the adapter into a full pipeline "
                 "folder.\n")
    rows = "labeled images" if cfg.data.unpaired else "pairs"
    unit = cfg.loss.unit
    text = card_front_matter(base, family, relation, [cfg.data.dataset]) + f"""
# {cfg.output.run_name}

{what}, trained with {cfg.loss.spec.method} by lora-dpo.

- Data: `{cfg.data.dataset}` (split `{cfg.data.split}`), {data_report.get("kept", "?")} {rows} kept of
  {data_report.get("rows", "?")}; skipped: {json.dumps(data_report.get("skipped", {}))}
- Loss: {cfg.loss.describe()}; {cfg.train.max_steps} steps, {cfg.train.batch_size} {unit} per device
  × {cfg.train.gradient_accumulation_steps} accumulation; optimizer `{cfg.optim.name}`, lr {cfg.optim.lr}
- Final metrics: `{json.dumps(shown)}`
- Full recipe: `recipe.yaml`; per-step metrics: `metrics.jsonl`
{_never_moved_warning(final_metrics)}
## Use

```python
from diffusers import {cls}
{use}
{card_prompt(prompt or data_report.get("example_caption"), call_kwargs)}
```
{other}"""
    path = Path(run_dir) / "README.md"
    path.write_text(text)
    return path

"""``lora-dpo generate``: images from a base model plus LoRA adapters, with their parameters in every PNG.

Prompts in compel syntax (``(word)1.3``, ``word++``, ``("a", "b").blend(0.7, 0.3)``, ``.and()``) reach the
pipeline as embeddings, through the family's compel class (:attr:`~lora_dpo.models.families.base.ModelFamily.compel_class_name`:
``CompelForSD``, ``CompelForSDXL``, ``CompelForFlux``). SD3 / SD3.5 has none in compel 2.5: its prompts go to the
pipeline as text (``pipe(prompt=..., negative_prompt=...)``), and a prompt that asks for weighting (a weight other
than 1, a blend, a conjunction) is refused before any weights load. FLUX.1 takes no negative prompt (its guidance is
distilled into the transformer, ``guidance_scale`` is an input of the model, not classifier-free guidance), so one is
refused; and its pipeline's default size is the real model's (1024 px), so small models want ``height``/``width``.
The flow-matching pipelines sample with their own ``FlowMatchEulerDiscreteScheduler``: ``scheduler`` must be
``default`` there (:data:`SCHEDULERS` are DDPM-schedule samplers).

Each image has its own ``torch.Generator("cpu").manual_seed(seed)`` (as in :mod:`lora_dpo.inference.sampling`), so
images with the adapters on and off, same seed, start from the same noise.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import compel
import diffusers
import torch
from compel import Compel
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from lora_dpo.inference import sampling
from lora_dpo.inference.grids import make_grid
from lora_dpo.models.families import family_for_index, family_of_pipeline
from lora_dpo.models.lora_files import check_adapter_fits_model, load_adapter
from lora_dpo.models.pretrained import DTYPES, read_model_index

_DPM = dict(algorithm_type="dpmsolver++", solver_order=2)
# name -> (diffusers class, from_config overrides, AUTOMATIC1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True), "PLMS"),  # as SD ships it; PRK fails at few steps
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", dict(_DPM, use_karras_sigmas=False), "DPM++ 2M"),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", dict(_DPM, use_karras_sigmas=True), "DPM++ 2M"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
SCHEDULER_NAMES = ("default", *SCHEDULERS)


def check_scheduler_name(name: str) -> None:
    """Raises ValueError, naming the closest valid name (difflib) and all of them, if ``name`` is not one."""
    if name not in SCHEDULER_NAMES:
        near = difflib.get_close_matches(str(name).lower(), SCHEDULER_NAMES, n=1, cutoff=0.4)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ValueError(f"unknown scheduler '{name}': {hint}choose one of {', '.join(SCHEDULER_NAMES)}")


def make_scheduler(name: str, config):
    """``<Class>.from_config(config, **overrides)`` for a name of :data:`SCHEDULERS`; ``config``:
    ``pipe.scheduler.config`` (the model's noise schedule). Raises ValueError for an unknown name."""
    check_scheduler_name(name)
    cls_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


@torch.no_grad()
def prompt_embeddings(pipe, prompt: str, negative_prompt: str = "") -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments for one compel-syntax prompt, from the pipeline's family
    (:meth:`lora_dpo.models.families.base.ModelFamily.prompt_embeddings`): ``prompt_embeds``,
    ``negative_prompt_embeds`` ``(1, T, D)`` padded to the same T (a multiple of the tokenizer's
    ``model_max_length``: long prompts are chunked, not truncated); SDXL adds ``pooled_prompt_embeds``,
    ``negative_pooled_prompt_embeds`` ``(1, P)``. compel's ``CompelForSD`` (last hidden state) or ``CompelForSDXL``
    (both encoders' penultimate hidden states, not normalized; pooled from the second encoder, from the raw prompt,
    syntax included). A plain prompt gives exactly ``pipe.encode_prompt``'s embeddings; an empty SDXL negative
    prompt zeros, as ``pipe(prompt)`` (``force_zeros_for_empty_prompt``). Built per call: compel caches the empty
    prompt."""
    family = family_of_pipeline(pipe)
    if family.compel_class_name is None:
        raise ValueError(f"compel has no prompt weighting for {family.label} pipelines: pass plain prompts")
    if negative_prompt and not takes_negative_prompt(family):
        raise ValueError(_no_negative_message(family))
    conditioning = getattr(compel, family.compel_class_name)(pipe)(prompt, negative_prompt=negative_prompt)
    return family.prompt_embeddings(conditioning, pipe, negative_prompt)


def takes_negative_prompt(family) -> bool:
    """The family's pipeline applies a negative prompt through classifier-free guidance. False for FLUX.1, whose
    ``guidance_scale`` is an input of the guidance-distilled transformer: diffusers' ``FluxPipeline`` reads a
    negative prompt only under ``true_cfg_scale`` (a second transformer pass per step), which this kit does not
    offer. Read off the pipeline's ``__call__``: a ``true_cfg_scale`` parameter marks it."""
    return "true_cfg_scale" not in inspect.signature(family.pipeline_class.__call__).parameters


def _no_negative_message(family) -> str:
    return (f"{family.label} takes no negative prompt (its guidance is distilled into the model; guidance_scale is "
            "the distilled guidance input, not classifier-free guidance): drop the negative prompt")


def is_weighted(prompt: str) -> bool:
    """The compel-syntax ``prompt`` asks for more than plain text: a fragment weight other than 1 (``(word)1.3``,
    ``word+``), a ``.blend()`` or an ``.and()`` of several prompts. Parentheses without a weight and quotes are
    compel's grouping only (weight 1): plain. Raises ValueError for a prompt compel cannot parse."""
    conjunction = Compel.parse_prompt_string(prompt)
    if len(conjunction.prompts) != 1 or any(w != 1.0 for w in conjunction.weights):
        return True
    flat = conjunction.prompts[0]
    return not hasattr(flat, "children") or any(
        type(f).__name__ != "Fragment" or f.weight != 1.0 for f in flat.children)


def check_prompts_for_family(family, prompts: Sequence[str], negative_prompt: str) -> None:
    """What the family's pipeline cannot do with the prompts, before any weights load.

    Raises:
        ValueError: a negative prompt for a family that takes none (FLUX.1: :func:`takes_negative_prompt`); a
            weighted prompt (:func:`is_weighted`) for a family compel has no class for (SD3 / SD3.5), naming it.
    """
    if negative_prompt and not takes_negative_prompt(family):
        raise ValueError(_no_negative_message(family))
    if family.compel_class_name is None:
        for text in (*prompts, negative_prompt):
            if is_weighted(text):
                raise ValueError(f"prompt {text!r} asks for compel weighting ((word)1.3, word+, .blend(), .and()), "
                                 f"which compel does not support for {family.label} pipelines: write it as plain "
                                 "text (it goes to the pipeline as written)")


def pipeline_prompt_kwargs(pipe, prompt: str, negative_prompt: str = "") -> dict:
    """The pipeline's prompt keyword arguments for one prompt: compel's embeddings
    (:func:`prompt_embeddings`) where compel supports the family; otherwise (SD3 / SD3.5) the text itself,
    ``prompt`` and ``negative_prompt``, which the pipeline encodes (``StableDiffusion3Pipeline.encode_prompt``:
    CLIP-L, CLIP-G and T5). Raises ValueError as :func:`check_prompts_for_family`."""
    family = family_of_pipeline(pipe)
    if family.compel_class_name is None:
        check_prompts_for_family(family, [prompt], negative_prompt)
        return dict(prompt=prompt, negative_prompt=negative_prompt)
    return prompt_embeddings(pipe, prompt, negative_prompt)


def check_scheduler_for_model(scheduler: str, model_index: dict) -> None:
    """Raises ValueError for a :data:`SCHEDULERS` name on a flow-matching pipeline (SD3, FLUX: a
    ``FlowMatch*`` scheduler in ``model_index.json``), whose velocity model the DDPM-schedule samplers cannot run."""
    spec = model_index.get("scheduler") or [None, ""]
    if scheduler != "default" and str(spec[1]).startswith("FlowMatch"):
        raise ValueError(f"scheduler '{scheduler}' samples a DDPM schedule; this pipeline is a flow-matching model "
                         f"({spec[1]}): use scheduler 'default'")


def lora_hash(path: str | Path) -> str:
    """SHA-256 (hex) of a safetensors file's tensor data, header excluded: the LoRA hash AUTOMATIC1111
    reports (first 12 characters, "Lora hashes") and civitai lists as AutoV3; metadata edits keep it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(8 + int.from_bytes(fh.read(8), "little"))
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def a1111_parameters(params: dict) -> str:
    """The AUTOMATIC1111 ``parameters`` text of one image (``params``: the JSON chunk's dict): the prompt
    with a ``<lora:name:scale>`` tag per active adapter; ``Negative prompt: ..`` (if any); ``Steps: ..,
    Sampler: .., [Schedule type: ..,] CFG scale: .., Seed: .., Size: WxH, Model: .., [Lora hashes: ..]``
    (a value holding , : or a newline JSON-quoted, as A1111 writes it)."""
    loras = params["adapters"] if params["adapters_enabled"] else []
    lines = [" ".join([params["prompt"], *(f"<lora:{a['name']}:{a['scale']:g}>" for a in loras)])]
    if params["negative_prompt"]:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = {"Steps": params["steps"], "Sampler": params["sampler"],
              "Schedule type": params["schedule_type"], "CFG scale": f"{params['guidance_scale']:g}",
              "Seed": params["seed"],
              "Size": f"{params['width']}x{params['height']}", "Model": params["model_name"],
              "Lora hashes": ", ".join(f"{a['name']}: {a['hash'][:12]}" for a in loras) or None}
    quote = lambda v: json.dumps(v, ensure_ascii=False) if any(c in v for c in ",:\n") else v  # noqa: E731
    lines.append(", ".join(f"{k}: {quote(str(v))}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


@contextmanager
def lora_disabled(pipe) -> Iterator[None]:
    """Run the block with the pipeline's LoRA layers off; they are on again after it, even after an error."""
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()


def _check_args(prompts, negative_prompt, adapters, seeds, steps, guidance, scheduler, sizes, dtype, device):
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    is_number = lambda x: is_int(x) or (isinstance(x, float) and math.isfinite(x))  # noqa: E731
    if not prompts or not all(isinstance(p, str) for p in (*prompts, negative_prompt)):
        raise ValueError("prompt must be a string or a non-empty list of strings (negative_prompt a string)")
    for text in (*prompts, negative_prompt):
        try:
            Compel.parse_prompt_string(text)
        except Exception as exc:
            raise ValueError(f"prompt {text!r} is not valid compel syntax ({exc}); see "
                             "https://github.com/damian0815/compel/blob/main/doc/syntax.md") from exc
    if not all(isinstance(a, (tuple, list)) and len(a) == 2 and is_number(a[1]) for a in adapters):
        raise ValueError(f"adapters must be (path, scale) pairs with a finite scale, got {adapters!r}")
    if not seeds or not all(is_int(s) and 0 <= s < 2**64 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds must be distinct integers in 0..2**64-1 (each names a file), got {seeds!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if not is_number(guidance) or guidance < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (> 1: guidance on), got {guidance!r}")
    check_scheduler_name(scheduler)
    if any(side is not None and (not is_int(side) or side <= 0 or side % 8) for side in sizes):
        raise ValueError(f"height and width must be positive multiples of 8 (None: the model's), got {sizes}")
    if dtype not in DTYPES or dtype == "no":
        raise ValueError(f"dtype must be one of float32, float16, bfloat16 (or fp16, bf16), got {dtype!r}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # bad name: RuntimeError
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU: pass device='cpu'")


def generate(model: str, prompt: str | list[str], *, negative_prompt: str = "",
             adapters: Sequence[tuple[str, float]] = (), seeds: Sequence[int] = (0,),
             num_inference_steps: int = 30, guidance_scale: float = 7.5, scheduler: str = "default",
             height: int | None = None, width: int | None = None, out_dir: str | Path,
             device: str | None = None, dtype: str = "float32", grid: bool = True,
             progress: bool = True) -> dict:
    """Generate one image per (prompt, seed) and write them as PNGs into ``out_dir``, with ``generate.json``.

    Files: ``lora_p<i>_s<seed>.png`` (adapters on) or ``base_p<i>_s<seed>.png`` (no adapters, or off); with
    adapters and ``grid``, both, and ``grid.png`` (:func:`lora_dpo.inference.grids.make_grid`: per prompt, base row
    above adapter row, a column per seed). Each PNG holds an AUTOMATIC1111 ``parameters`` chunk
    (:func:`a1111_parameters`) and a ``lora-dpo`` chunk: the JSON of every parameter.

    Args:
        model: diffusers SD1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 pipeline folder or hub id. prompt: compel syntax,
            one or a list (SD3: plain text; see the module docstring).
        negative_prompt: one for every prompt; FLUX.1 takes none (ValueError).
        adapters: ``(path, scale)`` pairs; path: a LoRA ``.safetensors`` file or a folder holding one.
        seeds: distinct integers; image (i, seed) uses ``torch.Generator("cpu").manual_seed(seed)``.
        scheduler: one of :data:`SCHEDULER_NAMES` (``default``: the model's own; the only one for SD3 / FLUX).
        height, width: x8 or None (the pipeline's default: the denoiser's sample size; FLUX.1: 1024).
        guidance_scale: classifier-free guidance (FLUX.1: the distilled guidance input, ignored by schnell).
        device: ``cuda`` when available, else ``cpu``. dtype: ``float32``, ``float16`` or ``bfloat16``.
    Returns:
        The report also written to ``generate.json``: parameters, ``images`` (file, kind, prompt, seed,
        seconds), ``grid`` (path or None), ``timings`` (``load_s``: checks, model, adapters; ...).
    Raises:
        Before any weights load: ValueError (a bad argument), ``models.ModelLoadError``, FileNotFoundError,
        ``lora_files.UnsafeFileError`` or ``lora_files.AdapterMismatchError`` (an adapter).
    """
    start = time.perf_counter()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds, adapters, out_dir = list(seeds), list(adapters), Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_args(prompts, negative_prompt, adapters, seeds, num_inference_steps, guidance_scale, scheduler,
                (height, width), dtype, device)
    index = read_model_index(str(model))
    model_family = family_for_index(index)
    family = model_family.name
    check_prompts_for_family(model_family, prompts, negative_prompt)
    check_scheduler_for_model(scheduler, index)
    files = [check_adapter_fits_model(path, model) for path, _ in adapters]  # safetensors, fits the model
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file: pass a folder")

    pipe = sampling.load_pipeline(model, device=device, dtype=DTYPES[dtype])
    if scheduler != "default":
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    info = _load_adapters(pipe, adapters, files)
    load_s = time.perf_counter() - start
    common = dict(model=str(model), model_name=Path(model).name if Path(model).exists() else str(model),
                  family=family, negative_prompt=negative_prompt, steps=num_inference_steps,
                  guidance_scale=float(guidance_scale), scheduler=scheduler, **_sampler_names(pipe.scheduler),
                  dtype=str(DTYPES[dtype]).removeprefix("torch."), device=str(device), adapters=info)
    out_dir.mkdir(parents=True, exist_ok=True)
    passes = ([("base", False)] if grid else []) + [("lora", True)] if info else [("base", False)]
    call = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                **model_family.sampling_kwargs(pipe))
    images, pictures = _render_passes(pipe, passes, prompts, seeds, negative_prompt, call, common, out_dir, progress)
    grid_file = out_dir / "grid.png" if len(passes) == 2 else None
    if grid_file:
        labels = [f"{text}  (seeds {', '.join(map(str, seeds))})" for text in prompts]
        rows = [[[pictures[k, i, s] for s in seeds] for i in range(len(prompts))] for k in ("base", "lora")]
        make_grid(labels, *rows).save(grid_file)
    total_s = time.perf_counter() - start
    timings = dict(load_s=load_s, generate_s=total_s - load_s, total_s=total_s,
                   seconds_per_image=(total_s - load_s) / len(images))
    last = next(reversed(pictures.values()))  # the last image made
    report = dict(common, prompts=prompts, seeds=seeds, width=last.width, height=last.height, images=images,
                  grid=grid_file and str(grid_file), timings={k: round(v, 4) for k, v in timings.items()})
    (out_dir / "generate.json").write_text(json.dumps(report, indent=2))
    return report


def _load_adapters(pipe, adapters: list[tuple[str, float]], files: list[Path]) -> list[dict]:
    """Load each adapter file as ``adapter<i>`` and activate them all at their scales. Returns one entry per
    adapter: ``name`` (its folder's name, else the file's stem), ``path``, ``file``, ``scale``, ``hash``
    (:func:`lora_hash`)."""
    info = []
    for i, ((path, scale), file) in enumerate(zip(adapters, files)):
        load_adapter(pipe, file, f"adapter{i}")
        name = Path(path).expanduser().name if Path(path).expanduser().is_dir() else file.stem
        info.append(dict(name=name, path=str(path), file=str(file), scale=float(scale), hash=lora_hash(file)))
    if info:
        pipe.set_adapters([f"adapter{i}" for i in range(len(info))], [a["scale"] for a in info])
    return info


def _sampler_names(scheduler) -> dict[str, str | None]:
    """The pipeline scheduler's AUTOMATIC1111 names: ``sampler`` (:data:`SCHEDULERS`' label, else the class name),
    ``scheduler_class``, ``schedule_type`` (``Karras`` or None)."""
    cls = type(scheduler).__name__
    sampler = next((label for c, _, label in SCHEDULERS.values() if c == cls), cls)
    karras = "Karras" if scheduler.config.get("use_karras_sigmas") else None
    return dict(sampler=sampler, scheduler_class=cls, schedule_type=karras)


def _render_passes(pipe, passes: list[tuple[str, bool]], prompts: list[str], seeds: list[int], negative_prompt: str,
                   call: dict, common: dict, out_dir: Path, progress: bool) -> tuple[list[dict], dict]:
    """One image per (pass, prompt, seed), each written as ``<kind>_p<i>_s<seed>.png`` with its parameters.

    Args:
        passes: ``(kind, adapters_enabled)`` pairs, e.g. ``[("base", False), ("lora", True)]``.
        call: the pipeline's sampler arguments (steps, guidance, height, width). common: the parameters every
            image shares (:func:`generate`'s report, ``adapters`` included).
    Returns:
        ``(images, pictures)``: the report's entries (file, kind, prompt, seed, seconds), in order, and the images
        by ``(kind, prompt index, seed)``.
    """
    images, pictures = [], {}
    with tqdm(total=len(passes) * len(prompts) * len(seeds), desc="generate", unit="img",
              disable=not progress) as bar:
        for kind, enabled in passes:
            # the adapters off for a base pass; fused into the weights for an adapter pass (as fast as the base)
            off, fuse = common["adapters"] and not enabled, common["adapters"] and enabled
            with lora_disabled(pipe) if off else sampling.fused_adapters(pipe) if fuse else nullcontext():
                for i, text in enumerate(prompts):
                    embeds = pipeline_prompt_kwargs(pipe, text, negative_prompt)
                    for seed in seeds:
                        t0 = time.perf_counter()
                        image = pipe(**embeds, generator=torch.Generator(device="cpu").manual_seed(seed), **call,
                                     output_type="pil").images[0].convert("RGB")
                        params = dict(common, prompt=text, seed=seed, width=image.width, height=image.height,
                                      adapters_enabled=enabled)
                        file = out_dir / f"{kind}_p{i:02d}_s{seed}.png"
                        _save_png(image, file, params)
                        pictures[kind, i, seed] = image
                        images.append(dict(file=str(file), kind=kind, prompt_index=i, prompt=text, seed=seed,
                                           seconds=round(time.perf_counter() - t0, 4)))
                        bar.update()
    return images, pictures


def _save_png(image, file: Path, params: dict) -> None:
    """Write ``image`` with two text chunks: AUTOMATIC1111's ``parameters`` (:func:`a1111_parameters`) and
    ``lora-dpo`` (the JSON of ``params``)."""
    png = PngInfo()  # tEXt chunks (iTXt for text outside latin-1)
    png.add_text("parameters", a1111_parameters(params))
    png.add_text("lora-dpo", json.dumps(params))
    image.save(file, pnginfo=png)

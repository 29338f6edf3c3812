"""The tools around training for the flow-matching families (SD3 / SD3.5, FLUX.1): the latent cache (training from
it reproduces training from the images; its key covers the σ density, FLUX's guidance and the components' configs;
the bf16 storage error), ``lora-dpo generate`` and ``lora-dpo eval`` (sampling through the family's pipeline, compel
where it supports the family, the implicit reward on the flow objective), and 2 processes = 1 process.

Float tolerances. Two runs that see the same pairs and draws differ only where a batched kernel (VAE, text encoder,
transformer) groups rows otherwise (the cache encodes 8 pairs per call, training 2), which rounds each per-sample
error e (an fp32 mean over a 16 x 16 x 16 latent) in its last bits. We allow δe = 16 ulp(e) per error (measured: at
most 1 ulp, test_cache.py; 16 covers the amplification through a few layers). The margin
u = -0.5·β·[(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))] then moves by at most 0.5·β·4·δe = 2βδe, and the loss
-log σ(u), whose slope in u is below 1, by as much. Adapters: Adam normalises the gradients, so a last-bit
perturbation of them moves the LoRA B matrices (zero at the start: all of B is training) by ‖ΔB‖/‖B‖ ≈ 4.5e-4 after
6 steps of 2 processes against 1 (test_distributed.py's measurement); we use its bound, 2e-3.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_dpo.config import load_config
from lora_dpo.data.cache import CachedPairDataset, check_cache
from lora_dpo.training.cache_build import build_cache
from lora_dpo.training.recipe import train

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sd3": "sd35", "flux": "flux"}
ADAPTER_TOLERANCE = 2e-3  # ‖ΔB‖ / ‖B‖, see the module docstring
STEPS = 2


def _ulps(e: float, n: int = 16) -> float:
    return n * float(np.spacing(np.float32(e)))


@pytest.fixture(scope="module")
def flow_models(tiny_flow) -> dict[str, Path]:
    return {family: tiny_flow[family] for family in RECIPES}


def _overrides(family, model, data, out, *extra):
    return [f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=32",
            f"output.dir={out}", "train.batch_size=2", "train.max_steps=4", "optim.name=adamw", "optim.lr=1e-3",
            "optim.lr_scheduler=constant", "optim.lr_warmup_steps=0", "output.tensorboard=false",
            "train.mixed_precision=no", "train.gradient_checkpointing=false", "train.gradient_accumulation_steps=1",
            "data.caption_dropout=0.3", *extra]


def _cfg(family, model, data, out, *extra):
    return load_config(ROOT / f"recipes/{RECIPES[family]}/lora_dpo.yaml", _overrides(family, model, data, out, *extra))


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def _b_matrices(path) -> torch.Tensor:
    weights = load_file(path)
    return torch.cat([weights[k].flatten() for k in sorted(weights) if "lora_B" in k])


# ----------------------------------------------------------------------------------------------------------
# The cache


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_from_the_cache_reproduces_the_image_run(family, flow_models, photo_pairs, tmp_path):
    """16-channel posteriors (mean − shift_factor), T5 + CLIP text stored once per caption, and the same draws: the
    cached run trains the image run's adapter up to rounding (tolerances: module docstring)."""
    cfg = _cfg(family, flow_models[family], photo_pairs, tmp_path / "images")
    manifest = build_cache(cfg, tmp_path / "cache", shard_size=7, progress=False)
    hidden = {"sd3": [32 + 256, 64], "flux": [512, 64]}[family]  # tiny CLIP: 32 tokens; T5: the pipeline's length
    assert manifest["latent_shape"] == [16, 16, 16] and manifest["hidden_shape"] == hidden
    assert manifest["text_keys"] == ["encoder_hidden_states", "pooled_projections"]
    assert manifest["pooled_shape"] == {"sd3": [48], "flux": [32]}[family] and manifest["family"] == family
    train(cfg)
    _reset_accelerate()
    cached = _cfg(family, flow_models[family], photo_pairs, tmp_path / "cached",
                  f"data.latent_cache={tmp_path / 'cache'}")
    result = train(cached)
    assert result.policy.unet is not None
    a, b = _metrics(tmp_path / "images"), _metrics(tmp_path / "cached")
    assert len(a) == len(b) == 4 and a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    beta = cfg.loss.beta
    for ra, rb in zip(a, b):
        assert ra["timestep"] == rb["timestep"]  # the same σ·1000 draws
        delta_e = _ulps(max(ra["mse/chosen"], ra["mse/rejected"]))
        assert abs(ra["loss"] - rb["loss"]) <= 2 * beta * delta_e, (ra["step"], ra["loss"], rb["loss"])
        assert abs(ra["mse/chosen"] - rb["mse/chosen"]) <= delta_e
    assert len({round(r["loss"], 4) for r in a}) > 2  # the run moved: the agreement is not trivial
    ba, bb = _b_matrices(tmp_path / "images" / "pytorch_lora_weights.safetensors"), _b_matrices(
        tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    assert ba.abs().max() > 1e-4 and (ba - bb).norm() / ba.norm() < ADAPTER_TOLERANCE


def test_reference_errors_are_keyed_by_the_sigma_density_and_guidance(flow_models, photo_pairs, tmp_path):
    """Precomputed reference errors depend on how σ is drawn and on FLUX's guidance input: a recipe that changes
    either refuses the cache; the posteriors alone do not depend on them. A changed component config is refused
    too (the model_index.json digest alone would not see it). Trained from the cache, step 1's loss is ln 2 up to the
    rounding of e_ref in other batch groupings (the stored e_ref is the untrained policy's)."""
    model = flow_models["flux"]
    no_dropout = "data.caption_dropout=0"
    cfg = _cfg("flux", model, photo_pairs, tmp_path / "run", no_dropout, "data.max_pairs=12")
    build_cache(cfg, tmp_path / "ref", reference_draws=1, progress=False)
    build_cache(cfg, tmp_path / "plain", progress=False)
    check_cache(_cfg("flux", model, photo_pairs, tmp_path / "run", no_dropout, "data.max_pairs=12",
                     "model.weighting_scheme=logit_normal", "model.guidance_scale=3.5"), tmp_path / "ref")  # defaults
    for override, key in (("model.weighting_scheme=mode", "sigma_sampling"), ("model.logit_std=2.0", "sigma_sampling"),
                          ("model.guidance_scale=2.0", "guidance_scale")):
        other = _cfg("flux", model, photo_pairs, tmp_path / "run", no_dropout, "data.max_pairs=12", override)
        with pytest.raises(ValueError, match=f"{key}: cache"):
            check_cache(other, tmp_path / "ref")
        check_cache(other, tmp_path / "plain")  # no reference errors: the latents do not depend on σ's density

    changed = tmp_path / "tiny-flux-shifted"  # the same model_index.json, another scheduler config
    shutil.copytree(model, changed)
    config_file = changed / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "max_shift": 1.5}))
    moved = _cfg("flux", changed, photo_pairs, tmp_path / "run", no_dropout, "data.max_pairs=12",
                 f"model.pretrained_model_name_or_path={model}")
    check_cache(moved, tmp_path / "ref")
    moved.model.pretrained_model_name_or_path = str(changed)
    with pytest.raises(ValueError, match="component_configs"):
        check_cache(moved, tmp_path / "ref")

    result = train(_cfg("flux", model, photo_pairs, tmp_path / "run", no_dropout, "data.max_pairs=12",
                        "train.max_steps=1", f"data.latent_cache={tmp_path / 'ref'}"))
    assert result.policy.unet is not None
    first = _metrics(tmp_path / "run")[0]
    bound = 2 * cfg.loss.beta * _ulps(max(first["mse/chosen"], first["mse/rejected"]))
    assert abs(first["loss"] - math.log(2)) <= bound and first["ref_mse/chosen"] > 0


def test_bfloat16_cache_error(flow_models, photo_pairs, tmp_path, capsys):
    """``--dtype bfloat16``: each stored posterior value is the fp32 one rounded to bf16's 8-bit significand, so
    |Δ| ≤ 2^-8·|x| element by element (round to nearest); the figure printed is ‖Δ‖ / ‖x‖ over the cache."""
    cfg = _cfg("flux", flow_models["flux"], photo_pairs, tmp_path / "run", "data.max_pairs=8")
    build_cache(cfg, tmp_path / "fp32", progress=False)
    build_cache(cfg, tmp_path / "bf16", storage_dtype="bfloat16", progress=False)
    check_cache(cfg, tmp_path / "bf16")  # the key records the storage dtype; a run reads the cache it names
    full, half = (CachedPairDataset(tmp_path / x, cfg.data, 0) for x in ("fp32", "bf16"))
    assert half.dtype == torch.bfloat16 and len(full) == len(half) == 8
    errors = {}
    for part in ("latent_mean", "latent_std"):
        x = torch.stack([full[i][part] for i in range(len(full))])
        y = torch.stack([half[i][part] for i in range(len(half))]).float()
        assert ((y - x).abs() <= 2.0**-8 * x.abs()).all()
        errors[part] = ((y - x).norm() / x.norm()).item()
        assert 0 < errors[part] < 2.0**-8
    with capsys.disabled():
        print(f"\nbf16 cache, tiny FLUX VAE: ||Δ||/||x|| posterior mean {errors['latent_mean']:.2e}, "
              f"std {errors['latent_std']:.2e}")


# ----------------------------------------------------------------------------------------------------------
# generate


def _random_lora(out: Path, model: Path, family: str, std: float = 0.3) -> Path:
    """A LoRA on the family's default targets with seeded random A and B (it changes the images clearly), written
    by the kit's exporter."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from lora_dpo.config import LoraConfig
    from lora_dpo.export.artifacts import save_lora_adapter
    from lora_dpo.models.adapters import add_lora

    cls = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family]
    transformer = cls.from_pretrained(model / "transformer")
    g = torch.Generator().manual_seed(1)
    for p in add_lora(transformer, LoraConfig(r=4, lora_alpha=4), family):
        p.data = torch.randn(p.shape, generator=g) * std
    save_lora_adapter(out, transformer, family)
    return out


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_samples_through_the_family_pipeline(family, flow_models, tmp_path):
    """Base and adapter images (fused into the transformer while sampling), the size asked, the base pass the same
    image as a run without adapters; what the family cannot do is refused before any weights load."""
    from lora_dpo.inference import generation as gen

    model = flow_models[family]
    lora = _random_lora(tmp_path / "lora", model, family)
    kw = dict(seeds=[3, 5], num_inference_steps=STEPS, height=32, width=48, guidance_scale=3.5, progress=False)
    report = gen.generate(str(model), "a red cat", adapters=[(str(lora), 1.0)], out_dir=tmp_path / "on", **kw)
    plain = gen.generate(str(model), "a red cat", out_dir=tmp_path / "plain", **kw)
    assert report["family"] == family and report["sampler"] == "FlowMatchEulerDiscreteScheduler"
    assert (report["width"], report["height"]) == (48, 32) and report["grid"]
    files = {(im["kind"], im["seed"]): im["file"] for im in report["images"]}
    for seed in (3, 5):
        base, tuned = _pixels(files["base", seed]), _pixels(files["lora", seed])
        assert base.shape == (32, 48, 3) and np.abs(base - tuned).mean() > 1  # the adapter changes the image
        assert np.array_equal(base, _pixels(next(im["file"] for im in plain["images"] if im["seed"] == seed)))
    assert not np.array_equal(_pixels(files["base", 3]), _pixels(files["base", 5]))

    with pytest.raises(ValueError, match="use scheduler 'default'"):
        gen.generate(str(model), "a cat", scheduler="euler", out_dir=tmp_path / "x", **kw)
    if family == "flux":
        with pytest.raises(ValueError, match="takes no negative prompt"):
            gen.generate(str(model), "a cat", negative_prompt="blurry", out_dir=tmp_path / "x", **kw)
    else:
        with pytest.raises(ValueError, match="compel does not support for SD3"):
            gen.generate(str(model), "a (red)1.4 cat", out_dir=tmp_path / "x", **kw)
        negative = gen.generate(str(model), "a cat (sitting)", negative_prompt="blurry", out_dir=tmp_path / "neg",
                                **kw)  # plain text, parentheses included, goes to the pipeline; so does the negative
        assert len(negative["images"]) == 2
    assert not (tmp_path / "x").exists()


def test_flux_prompt_weighting_goes_through_compel(flow_models):
    """CompelForFlux: the pooled CLIP embedding of a plain prompt is the pipeline's own, T5's states are too up to the
    rounding of encoding in another batch (compel encodes the prompt with its negative); a weight changes them. SD3
    has no compel class: its prompts pass as text."""
    from lora_dpo.inference import generation as gen
    from lora_dpo.inference import sampling

    pipe = sampling.load_pipeline(flow_models["flux"])
    plain = gen.prompt_embeddings(pipe, "a red cat")
    weighted = gen.prompt_embeddings(pipe, "a (red)1.5 cat")
    ref_states, ref_pooled, _ = pipe.encode_prompt("a red cat", prompt_2=None, device="cpu")
    assert set(plain) == {"prompt_embeds", "pooled_prompt_embeds"} and plain["prompt_embeds"].shape == (1, 512, 64)
    assert torch.equal(plain["pooled_prompt_embeds"], ref_pooled)
    # T5 ends in a layer norm: states of size ~1, rounded per element in the last bits of fp32 (64 ulp at the largest)
    bound = 64 * float(np.spacing(np.float32(ref_states.abs().max().item())))
    assert (plain["prompt_embeds"] - ref_states).abs().max() <= bound
    assert (weighted["prompt_embeds"] - plain["prompt_embeds"]).abs().max() > 100 * bound
    with pytest.raises(ValueError, match="takes no negative prompt"):
        gen.prompt_embeddings(pipe, "a cat", negative_prompt="blurry")
    sd3 = sampling.load_pipeline(flow_models["sd3"])
    assert gen.pipeline_prompt_kwargs(sd3, "a cat (x)", "dull") == {"prompt": "a cat (x)", "negative_prompt": "dull"}
    with pytest.raises(ValueError, match="compel has no prompt weighting for SD3"):
        gen.prompt_embeddings(sd3, "a cat")


def test_fused_adapters_on_the_transformer(flow_models, tmp_path):
    """fused_adapters folds the LoRA into pipe.transformer for the block (the same latents up to rounding) and puts
    the base weights back bit for bit."""
    from lora_dpo.inference import sampling
    from lora_dpo.inference.generation import lora_disabled
    from lora_dpo.models.lora_files import load_adapter

    pipe = sampling.load_pipeline(flow_models["flux"])
    load_adapter(pipe, _random_lora(tmp_path / "lora", flow_models["flux"], "flux"), "a")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    kw = dict(prompt="a cat", num_inference_steps=STEPS, height=32, width=32, output_type="latent")
    unfused = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    with sampling.fused_adapters(pipe) as n:
        assert n > 0 and n == sum(1 for m in pipe.transformer.modules() if getattr(m, "merged", False))
        fused = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with lora_disabled(pipe):
        base = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    # fused W + sBA vs unfused W·x + s·B(A·x): one sum in another order, through STEPS transformer passes
    scale = unfused.abs().max().item()
    assert (fused - unfused).abs().max() <= 1e-4 * scale < (base - unfused).abs().max()


# ----------------------------------------------------------------------------------------------------------
# eval


class _Brightness:
    name = "brightness"

    def score(self, images, prompts):
        return np.array([np.asarray(im, dtype=np.float64).mean() for im in images])


@torch.no_grad()
def _margin_by_hand(run, cfg, pairs) -> float:
    """Eq. 14's margin of held-out pair 0, draw 0, with the flow objective written out: σ = t / 1000,
    x_σ = (1 − σ)·x_0 + σ·ε, target ε − x_0 (the DDPM noising would give other errors)."""
    from lora_dpo.data.draws import EVAL_SALT, draw_seed, pair_draws
    from lora_dpo.data.pairs import PairDataset, collate_pairs
    from lora_dpo.data.sources import load_preference_dataset
    from lora_dpo.evaluation.implicit_reward import _heldout_data_config, _load_policy, load_exported_adapter
    from lora_dpo.models.loading import (
        encode_posterior,
        encode_prompts,
        predict,
        timestep_sampler,
        unet_conditioning,
    )

    components, reference = _load_policy(run, cfg, load_exported_adapter(run, "transformer"), torch.float32, "cpu")
    data_cfg = _heldout_data_config(cfg, pairs, 1)
    batch = collate_pairs([PairDataset(load_preference_dataset(data_cfg)[0], data_cfg, 0)[0]])
    mean, std = encode_posterior(components, batch.pixel_values)
    eps_z, noise, t = pair_draws([draw_seed(EVAL_SALT, 0, batch.indices[0], 0)], mean.shape[1:], 1000, None,
                                 timestep_sampler(components, mean.shape[1:]))
    x0 = (mean + std * eps_z) * components.latent_scale
    sigma = (t / 1000).repeat(2).view(2, 1, 1, 1)
    noisy, target = (1 - sigma) * x0 + sigma * noise.repeat(2, 1, 1, 1), noise.repeat(2, 1, 1, 1) - x0
    cond = unet_conditioning(components, encode_prompts(components, batch.captions), batch, torch.float32)
    errors = []
    for use_reference in (False, True):
        with reference() if use_reference else _nothing(components.unet) as denoiser:
            pred = predict(components, denoiser, noisy, t.repeat(2), cond)
        errors.append(((pred.float() - target) ** 2).mean(dim=(1, 2, 3)))
    (pw, pl), (rw, rl) = errors
    return float(-0.5 * cfg.loss.beta * ((pw - rw) - (pl - rl)))


class _nothing:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def test_flux_run_evaluates_with_the_flow_objective(flow_models, photo_pairs, tmp_path):
    """lora-dpo eval on a FLUX run: base and tuned images at the training resolution, and the implicit reward on
    the family's noising (checked against the flow objective written out for one pair)."""
    from lora_dpo.evaluation.implicit_reward import implicit_reward_accuracy
    from lora_dpo.evaluation.run import evaluate_run

    run = tmp_path / "run"
    cfg = _cfg("flux", flow_models["flux"], photo_pairs, run, "train.max_steps=2", "model.guidance_scale=2.5")
    train(cfg)
    weights = load_file(run / "pytorch_lora_weights.safetensors")  # 2 steps move B by ~lr: make the change visible
    save_file({k: v * 100 if "lora_B" in k else v for k, v in weights.items()}, run / "pytorch_lora_weights.safetensors")
    report = evaluate_run(run, scorer_spec=_Brightness(), prompts=["a cat"], seeds_per_prompt=2,
                          num_inference_steps=STEPS, heldout_pairs=photo_pairs,
                          max_heldout_pairs=2, implicit_draws=1, out_dir=tmp_path / "eval", save_images=True)
    assert report["family"] == "flux" and report["n_comparisons"] == 2 and report["identical_images"] == 0
    assert report["settings"]["guidance_scale"] == 2.5  # sampled with the guidance the run trained with
    for kind in ("base", "tuned"):
        assert Image.open(tmp_path / "eval" / "eval_samples" / kind / "000_10000.png").size == (32, 32)
    assert report["implicit_reward"]["n_pairs"] == 2
    cfg = load_config(run / "recipe.yaml")
    one = implicit_reward_accuracy(run, cfg, photo_pairs, draws=1, max_pairs=1)
    by_hand = _margin_by_hand(run, cfg, photo_pairs)
    assert abs(by_hand) > 1e-3  # the adapter moved the errors: the comparison is not of two zeros
    # the same computation in the same shapes, up to the order of the error means' sums: 4 errors, δe each
    delta_e = _ulps(4.0)
    assert one["margin_mean"] == pytest.approx(by_hand, abs=2 * cfg.loss.beta * delta_e)


# ----------------------------------------------------------------------------------------------------------
# 2 processes


def _train_cli(model, data, out, *extra, processes=1):
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, "-m", "lora_dpo.cli", "train", str(ROOT / "recipes/flux/lora_dpo.yaml"),
           *_overrides("flux", model, data, out, "data.max_pairs=16", "train.max_steps=3", "data.caption_dropout=0.2",
                       "optim.lr=1e-4", *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_train_the_flux_adapter_of_one(flow_models, photo_pairs, tmp_path):
    """torchrun, gloo on the CPU: 2 processes × 2 pairs train what 1 process × 4 pairs trains (keyed σ, noise and
    posterior draws per pair; gradients averaged), up to the order of the float sums (module docstring)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train_cli(flow_models["flux"], photo_pairs, one, "train.batch_size=4")
    proc = _train_cli(flow_models["flux"], photo_pairs, two, "train.batch_size=2", processes=2)
    assert "× 2 processes" in proc.stderr
    a, b = (_b_matrices(run / "pytorch_lora_weights.safetensors") for run in (one, two))
    assert a.abs().max() > 1e-5 and (a - b).norm() / a.norm() < ADAPTER_TOLERANCE
    beta = load_config(one / "recipe.yaml").loss.beta
    for ra, rb in zip(_metrics(one), _metrics(two), strict=True):
        assert ra["step"] == rb["step"] and ra["timestep"] == pytest.approx(rb["timestep"], rel=1e-6)
        delta_e = _ulps(max(ra["mse/chosen"], ra["mse/rejected"]))
        assert abs(ra["mse/chosen"] - rb["mse/chosen"]) <= delta_e
        assert abs(ra["loss"] - rb["loss"]) <= 2 * beta * delta_e, (ra["step"], ra["loss"], rb["loss"])

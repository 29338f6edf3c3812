"""Flow-DPO on the SD3 and FLUX families (issue 17): recognition, conditioning as the pipelines compute it, σ draws,
training through the CLI with the shipped recipes, exact resume, the exported adapter in the pipeline's own
``load_lora_weights``, full fine-tuning, and the options a family refuses before any weights load."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import load_file

from lora_dpo.cli import main
from lora_dpo.config import RecipeConfig, load_config
from lora_dpo.library_noise import KNOWN_WARNINGS, quiet_known_warnings
from lora_dpo.models.adapters import add_lora, load_lora_state_dict
from lora_dpo.models.families import family_for_index, get_family
from lora_dpo.models.families.flow_matching import sample_density, scheduler_shift
from lora_dpo.models.families.flux import latent_image_ids, pack_latents, unpack_latents
from lora_dpo.models.loading import load_components
from lora_dpo.models.pretrained import read_model_index
from lora_dpo.training.diagnostics import timestep_bucket_sums

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sd3": ROOT / "recipes/sd35/lora_dpo.yaml", "flux": ROOT / "recipes/flux/lora_dpo.yaml"}
FLOW = ("sd3", "flux")


def _args(model, data, out, *extra):
    return [f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=32",
            f"output.dir={out}", "train.batch_size=2", "train.max_steps=3", "train.checkpoint_every=1",
            "optim.name=adamw", "optim.lr=1e-3", "optim.lr_warmup_steps=0", "optim.lr_scheduler=constant",
            "output.tensorboard=false", "train.gradient_accumulation_steps=1", "train.mixed_precision=no",
            "train.gradient_checkpointing=false", *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _eps_bound(*tensors: torch.Tensor, ops: int) -> float:
    """A bound on fp32 rounding after ``ops`` roundings of values of this size."""
    return ops * torch.finfo(torch.float32).eps * max(t.abs().max().item() for t in tensors)


def test_families_are_recognised_from_model_index(tiny_flow):
    for family, path in tiny_flow.items():
        index = read_model_index(str(path))
        assert family_for_index(index).name == family
        # an unknown (community) pipeline class with the family's components
        assert family_for_index({**index, "_class_name": "MyCustomPipeline"}).name == family
    with pytest.raises(Exception, match="PixArtAlphaPipeline.*not supported"):
        family_for_index({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]})


@pytest.mark.parametrize("family", FLOW)
def test_text_conditioning_is_the_pipelines(family, tiny_flow):
    comps = load_components(RecipeConfig(model={"pretrained_model_name_or_path": str(tiny_flow[family])}).model,
                            torch.float32)
    captions = ["a photo of a cat", "the digit seven on a white background"]
    ours = comps.model_family.encode_prompts(comps, captions)
    pipe = get_family(family).pipeline_class.from_pretrained(tiny_flow[family])
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False)
    else:
        embeds, pooled, _ = pipe.encode_prompt(captions, captions)
    assert ours["encoder_hidden_states"].shape == embeds.shape and ours["pooled_projections"].shape == pooled.shape
    # Same weights, same ids: only kernel rounding may differ (the pipeline's copy of T5 sits elsewhere in memory).
    T5_LAYERS = 2
    assert (ours["encoder_hidden_states"] - embeds).abs().max() <= _eps_bound(embeds, ops=64 * T5_LAYERS)
    assert torch.equal(ours["pooled_projections"], pooled)


def test_flux_packing_matches_the_pipeline():
    x = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(latent_image_ids(4, 3, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("family", FLOW)
def test_sigma_draws_follow_the_density_and_the_shift(family, tiny_flow):
    cfg = RecipeConfig(model={"pretrained_model_name_or_path": str(tiny_flow[family]), "weighting_scheme": "uniform"})
    comps = load_components(cfg.model, torch.float32)
    spec = comps.model_family
    n, shape = 4000, (16, 64, 64)  # 64 x 64 latent: 1024 FLUX tokens
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t = spec.sample_timesteps(comps, g1, n, shape)
    expected = scheduler_shift(sample_density("uniform", n, g2), comps.noise_scheduler.config, 1024) * 1000
    assert torch.equal(t, expected)
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1000
    # The shift moves mass to high noise: the median σ is the shifted 0.5, not 0.5.
    config = comps.noise_scheduler.config
    median = float(scheduler_shift(torch.tensor([0.5]), config, 1024))
    assert median > 0.5
    assert abs(t.median().item() / 1000 - median) < 4 / math.sqrt(n)  # a few standard errors of a median
    # σ noising and the velocity target: x_σ = (1 − σ)·x_0 + σ·ε, v = ε − x_0
    x0, eps = torch.randn(2, *shape[:1], 4, 4), torch.randn(2, shape[0], 4, 4)
    ts = torch.tensor([250.0, 900.0])
    noisy = spec.add_noise(comps, x0, eps, ts)
    assert torch.allclose(noisy[1], 0.1 * x0[1] + 0.9 * eps[1], atol=_eps_bound(x0, eps, ops=4))
    assert torch.equal(spec.training_target(comps, x0, eps, ts), eps - x0)


def test_timestep_buckets_read_sigma():
    margins = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sigmas_t = torch.tensor([0.1, 0.3, 0.6, 0.999]) * 1000
    sums = timestep_bucket_sums(margins, sigmas_t, 1000)
    assert [sums[f"rewards/margins_t{lo}-{hi}:count"].item() for lo, hi in
            ((0, 249), (250, 499), (500, 749), (750, 999))] == [1, 1, 1, 1]


@pytest.mark.parametrize("family", FLOW)
def test_recipe_trains_and_the_pipeline_loads_the_policy(family, tiny_flow, photo_pairs, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(RECIPES[family]), *_args(tiny_flow[family], photo_pairs, out)]) == 0
    rows = _metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter: policy = reference
    assert rows[0]["rewards/margins"] == 0 and any(r["rewards/margins"] != 0 for r in rows[1:])
    assert any(k.startswith("rewards/margins_t") for k in rows[-1])
    cfg = load_config(out / "recipe.yaml")
    assert cfg.loss.beta == load_config(RECIPES[family]).loss.beta
    spec = get_family(family)
    # The trained policy, rebuilt from the last checkpoint through the kit's loader ...
    comps = load_components(cfg.model, torch.float32)
    add_lora(comps.unet, cfg.lora, family)
    load_lora_state_dict(comps.unet, load_file(out / "checkpoints/step_3/trainable_weights.safetensors"))
    # ... equals a fresh pipeline with the exported adapter (its own load_lora_weights, alpha from the header).
    pipe = spec.pipeline_class.from_pretrained(tiny_flow[family])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 16, 16, generator=g), torch.tensor([300.0, 800.0])
    cond = spec.denoiser_conditioning(comps, spec.encode_prompts(comps, ["a cat", "a dog"]), None, torch.float32, 1)
    with torch.no_grad():
        base = spec.predict(pipe.transformer, x, t, cond)
        pipe.load_lora_weights(out)
        loaded = spec.predict(pipe.transformer, x, t, cond)
        policy = spec.predict(comps.unet, x, t, cond)
    assert (loaded - policy).abs().max() <= 1e-5
    assert (loaded - base).abs().max() > 100 * (loaded - policy).abs().max() + 1e-6
    targeted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A")}
    assert "proj_out" not in targeted  # FLUX's output layer is not a single block's proj_out
    if family == "flux":
        assert "single_transformer_blocks.0.proj_out" in targeted and "transformer_blocks.0.ff.net.2" in targeted
    else:
        assert "transformer_blocks.0.attn.add_q_proj" in targeted


def test_resume_is_exact(tiny_flow, photo_pairs, tmp_path):
    model = tiny_flow["flux"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", str(RECIPES["flux"]), *_args(model, photo_pairs, full)]) == 0
    assert main(["train", str(RECIPES["flux"]), *_args(model, photo_pairs, part, "train.max_steps=2")]) == 0
    assert main(["train", str(RECIPES["flux"]), *_args(model, photo_pairs, part, "train.resume_from=latest")]) == 0
    a = load_file(full / "checkpoints/step_3/trainable_weights.safetensors")
    b = load_file(part / "checkpoints/step_3/trainable_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(full)[-1]["loss"] == _metrics(part)[-1]["loss"]


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "adafactor"])
def test_full_fine_tuning_with_a_frozen_copy(optim, tiny_flow, photo_pairs, tmp_path):
    out = tmp_path / "run"
    extra = ["train.mode=full", f"optim.name={optim}", "train.max_steps=2", "optim.lr=1e-4"]
    assert main(["train", str(RECIPES["flux"]), *_args(tiny_flow["flux"], photo_pairs, out, *extra)]) == 0
    rows = _metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = FluxPipeline.from_pretrained(out)  # a whole pipeline whose transformer is the tuned one
    base = FluxPipeline.from_pretrained(tiny_flow["flux"])
    moved = max((p - q).abs().max().item() for p, q in zip(pipe.transformer.parameters(), base.transformer.parameters()))
    assert moved > 0
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)


@pytest.mark.parametrize("override, message", [
    ("model.weighting_scheme=uniform", "model.weighting_scheme applies to the flow-matching families"),
    ("model.quantization=nf4", "model.quantization applies to the flow-matching families"),
])
def test_unet_families_refuse_flow_options(override, message, tiny_sd15, photo_pairs, tmp_path, capsys):
    rc = main(["train", str(ROOT / "recipes/sd15/lora_dpo.yaml"), *_args(tiny_sd15, photo_pairs, tmp_path / "r"),
               override])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before the run folder or any weights


def test_flow_families_refuse_prediction_type(tiny_flow, photo_pairs, tmp_path, capsys):
    rc = main(["train", str(RECIPES["sd3"]), *_args(tiny_flow["sd3"], photo_pairs, tmp_path / "r"),
               "model.prediction_type=epsilon"])
    err = capsys.readouterr().err
    assert rc == 2 and "flow velocity" in err and "Traceback" not in err


def test_recipe_for_another_family_warns(tiny_flow, photo_pairs, tmp_path, capsys):
    rc = main(["validate", str(RECIPES["flux"]), *_args(tiny_flow["sd3"], photo_pairs, tmp_path / "r")[:3]])
    err = capsys.readouterr()
    text = err.out + err.err
    assert rc == 0 and "recipe for FLUX.1 but the model is SD3/SD3.5" in text and "recipes/sd35/" in text


def test_peft_exclude_warning_of_a_loaded_flux_adapter_is_quieted():
    row = next(r for r in KNOWN_WARNINGS if r.category is UserWarning)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn(row.example, UserWarning, stacklevel=1)
        warnings.warn("You have passed exclude_modules=ff but no modules were excluded.", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["You have passed exclude_modules=ff but no modules were excluded."]


def test_resolution_must_fit_the_patches(tiny_flow, photo_pairs, tmp_path, capsys):
    # A FLUX folder whose VAE downsamples by 8 (4 blocks): 520 px is a 65 x 65 latent, which 2 x 2 patches do not cut.
    model = tmp_path / "flux-vae8"
    (model / "vae").mkdir(parents=True)
    (model / "model_index.json").write_text((tiny_flow["flux"] / "model_index.json").read_text())
    vae = json.loads((tiny_flow["flux"] / "vae/config.json").read_text())
    (model / "vae/config.json").write_text(json.dumps({**vae, "block_out_channels": [128, 256, 512, 512]}))
    rc = main(["train", str(RECIPES["flux"]), *_args(model, photo_pairs, tmp_path / "r"), "data.resolution=520"])
    err = capsys.readouterr().err
    assert rc == 2 and "must be a multiple of 16 for FLUX.1" in err and "try data.resolution=512" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("loss", ["sigmoid-smoothed", "ipo", "hinge", "sdpo", "mapo", "kto", "sft", "sft-anchor"])
def test_every_loss_of_the_family_trains_on_sigma(loss, tiny_flow, photo_pairs, tmp_path):
    """Each loss runs on FLUX's σ draws (packed tokens, guidance, SFT's preferred rows only); the losses with a
    reference start where a fresh adapter must: u = 0."""
    extra = {"sigmoid-smoothed": ["loss.label_smoothing=0.1"], "sdpo": ["loss.sdpo_mu=0.5"],
             "sft-anchor": ["loss.sft_weight=0.5"]}.get(loss, [f"loss.type={loss}"])
    out = tmp_path / "run"
    assert main(["train", str(RECIPES["flux"]), *_args(tiny_flow["flux"], photo_pairs, out, "train.max_steps=2",
                                                        *extra)]) == 0
    rows = _metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows)
    if "rewards/margins" in rows[0] and loss not in ("mapo", "sft"):
        assert rows[0]["rewards/margins"] == 0
        assert 0.0 < rows[0]["timestep"] < 1000  # σ·1000


@pytest.mark.parametrize("family", FLOW)
def test_a_shorter_t5_tokenizer_sets_the_text_length_of_training_and_sampling(family, tiny_flow, tmp_path):
    """A pipeline whose T5 tokenizer says its model takes 12 tokens (``model_max_length``, as the digits-sd3 world
    says 32) is trained and sampled on 12 T5 tokens, not the pipeline's default 256 / 512: the kit's conditioning is
    the pipeline's at ``max_sequence_length=12``, and ``generate_images`` samples what
    ``pipe(..., max_sequence_length=12)`` does."""
    import shutil

    from lora_dpo.inference.sampling import generate_images

    spec = get_family(family)
    folder = shutil.copytree(tiny_flow[family], tmp_path / family)
    config_file = folder / spec.t5_tokenizer_name / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_max_length": 12}))
    comps = load_components(RecipeConfig(model={"pretrained_model_name_or_path": str(folder)}).model, torch.float32)
    captions = ["a photo of a cat", "the digit seven on a white background"]
    ours = comps.model_family.encode_prompts(comps, captions)
    pipe = spec.pipeline_class.from_pretrained(folder)
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                                  max_sequence_length=12)
        assert embeds.shape[1] == comps.tokenizers[0].model_max_length + 12
    else:
        embeds, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=12)
        assert embeds.shape[1] == 12
    assert ours["encoder_hidden_states"].shape == embeds.shape
    assert (ours["encoder_hidden_states"] - embeds).abs().max() <= _eps_bound(embeds, ops=64 * 2)
    assert spec.sampling_kwargs(pipe) == {"max_sequence_length": 12}

    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, guidance_scale=3.5, height=32, width=32)
    ours_image = generate_images(pipe, captions[:1], [3], **kw)[0]
    direct = [pipe(captions[0], generator=torch.Generator().manual_seed(3), max_sequence_length=n, output_type="pil",
                   **kw).images[0] for n in (12, spec.max_sequence_length)]
    assert np.array_equal(np.asarray(ours_image), np.asarray(direct[0].convert("RGB")))
    assert not np.array_equal(np.asarray(direct[0]), np.asarray(direct[1]))  # the length changes the image

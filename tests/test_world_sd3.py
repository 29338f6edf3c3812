"""The digits-sd3 world (issue 19): the committed SD3-layout world opens with diffusers and through the kit, is small
and imperfect as recorded, its preference sets have the Pick-a-Pic schema, one Flow-DPO step on it gives ln 2, the
build command works at smoke size, and the demo runs its recipes."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from lora_dpo.cli import main
from lora_dpo.config import DataConfig, ModelConfig, load_config
from lora_dpo.data.sources import load_preference_dataset
from lora_dpo.feedback.prompts import digit_caption
from lora_dpo.models.loading import encode_posterior, load_components
from lora_dpo.world.build import HELDOUT_SEED_OFFSET, TRAIN_SEED_OFFSET
from lora_dpo.world.flow import FLOW_WORLD_DIR, FlowWorldConfig, build_flow_world
from lora_dpo.world.worlds import WORLDS

WORLD = WORLDS["digits-sd3"]
REPORT = json.loads((FLOW_WORLD_DIR / "world.json").read_text())


def test_committed_world_opens_with_diffusers_and_the_kit():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(WORLD.pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert all(getattr(pipe, f"text_encoder{s}") is not None for s in ("", "_2", "_3"))
    assert pipe.vae.config.shift_factor is not None  # z = (x - shift)·scale, as SD3's VAE
    image = pipe(digit_caption(3), num_inference_steps=4, max_sequence_length=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)

    comps = load_components(ModelConfig(pretrained_model_name_or_path=str(WORLD.pipeline)), torch.float32)
    assert comps.family == "sd3" and comps.prediction_type == "flow"
    mean, std = encode_posterior(comps, torch.zeros(1, 3, 32, 32))
    assert mean.shape == std.shape == (1, 4, 8, 8) and (std > 0).all()
    # the world is trained and sampled on 32 T5 tokens, which its T5 tokenizer declares
    assert comps.model_family.sampling_kwargs(pipe) == {"max_sequence_length": 32}
    text = comps.model_family.encode_prompts(comps, [digit_caption(3)])
    assert text["encoder_hidden_states"].shape[1] == pipe.tokenizer.model_max_length + 32
    # the model card's usage line says so, also for a run from the latent cache (no tokenizers loaded)
    model_cfg = ModelConfig(pretrained_model_name_or_path=str(WORLD.pipeline))
    bare = load_components(model_cfg, torch.float32, encoders=False)
    assert not bare.tokenizers
    for loaded in (comps, bare):
        assert comps.model_family.usage_kwargs(loaded, model_cfg) == {"max_sequence_length": 32}


def test_world_is_small_and_imperfect():
    size = sum(f.stat().st_size for f in FLOW_WORLD_DIR.rglob("*") if f.is_file()) / 1e6
    assert size < 20, f"world is {size:.1f} MB"
    assert 0.40 <= REPORT["base_sample_accuracy"] <= 0.75  # recognisable, with room for alignment
    assert REPORT["base_sample_accuracy_settings"]["seeds_per_prompt"] * 10 >= 400
    assert REPORT["scorer"]["test_accuracy"] > 0.95


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_preference_sets_have_the_pick_a_pic_schema(split):
    pairs = REPORT["config"][f"{split}_pairs_per_prompt"]
    offset = TRAIN_SEED_OFFSET if split == "train" else HELDOUT_SEED_OFFSET
    table = pq.read_table(WORLD.prefs(split))
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(table.column_names)
    assert table.num_rows == 10 * pairs
    assert set(table.column("label_0").to_pylist()) <= {0.0, 0.5, 1.0}
    assert set(table.column("caption").to_pylist()) == {digit_caption(d) for d in range(10)}
    seeds = table.select(["seed_0", "seed_1"]).to_pandas()
    assert seeds.min().min() >= offset and seeds.max().max() < offset + 2 * pairs
    dataset, report = load_preference_dataset(DataConfig(dataset=str(WORLD.prefs(split)), resolution=32))
    assert report["kept"] + report["skipped"].get("tie", 0) == 10 * pairs


def test_one_flow_dpo_step_on_the_world_gives_ln_2(tmp_path):
    """The shipped recipe on the committed world: a fresh adapter is the reference, so u = 0 and the first loss is
    ln 2 (the LoRA up-projections start at zero: policy and reference give the same numbers)."""
    from lora_dpo.training.recipe import train

    cfg = load_config(WORLD.recipe("lora_dpo"), [
        f"model.pretrained_model_name_or_path={WORLD.pipeline}", f"data.dataset={WORLD.prefs('train')}",
        f"output.dir={tmp_path}", "train.max_steps=1", "train.batch_size=4", "output.tensorboard=false"])
    result = train(cfg)
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0.0 and first["mse/chosen"] > 0
    # the card's usage line samples on the 32 T5 tokens the model trained on
    assert "max_sequence_length=32).images[0]" in (result.run_dir / "README.md").read_text()


def test_build_command_at_smoke_size(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    cfg = FlowWorldConfig(vae_steps=4, transformer_steps=6, eval_every=3, eval_seeds_per_prompt=1,
                          final_eval_seeds_per_prompt=1, sample_steps=2, train_pairs_per_prompt=1,
                          heldout_pairs_per_prompt=1)
    out = tmp_path / "world"
    report = build_flow_world(out, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["pipeline", "prefs", "scorer", "world.json"]
    assert set(report["transformer"]["sample_accuracy_during_training"]) == {3, 6}
    assert 0.0 <= report["base_sample_accuracy"] <= 1.0 and report["vae"]["shift_factor"] is not None
    assert pq.read_table(out / "prefs/train.parquet").num_rows == 10
    assert json.loads((out / "world.json").read_text())["config"]["transformer_steps"] == 6
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "pipeline")
    assert pipe.tokenizer_3.model_max_length == cfg.t5_max_length


def test_demo_rounds_runs_on_the_sd3_world(tmp_path, capsys):
    """``lora-dpo demo --world digits-sd3 --rounds 1`` (made tiny by overrides): the SD3 world's iterate recipe
    samples, scores, trains and evaluates a flow model end to end, judged by the digit classifier."""
    out = tmp_path / "demo"
    code = main(["demo", "--world", "digits-sd3", "--rounds", "1", f"output.dir={out}", "iterate.groups_per_prompt=1",
                 "iterate.candidates=2", "train.max_steps=2", "train.batch_size=2", "iterate.eval_seeds_per_prompt=1",
                 "iterate.implicit_draws=1", "iterate.num_inference_steps=2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    vs_base = json.loads((out / "iterate.json").read_text())["rounds"][0]["vs_base"]
    assert vs_base["n_comparisons"] == 10 and vs_base["accuracy_base"] is not None
    assert vs_base["implicit_reward"]["n_pairs"] == 10 * REPORT["config"]["heldout_pairs_per_prompt"]
    assert (out / "round_1" / "prefs.parquet").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()

"""Recipes and the typed config: every shipped recipe validates; bad input fails fast with a useful message."""

from pathlib import Path

import pytest
import yaml

from lora_dpo.config import ConfigError, RecipeConfig, load_config

# Training recipes; recipes/accelerate/ holds launcher configs (tests/test_distributed.py checks them).
RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


def test_recipes_found():
    names = {str(p.relative_to(p.parents[1])) for p in RECIPES}
    assert {"sd15/lora_dpo.yaml", "sdxl/lora_dpo.yaml", "digits/lora_dpo.yaml", "digits/sft.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_validates(recipe):
    cfg = load_config(recipe)
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("#"), "recipes start with a header comment"
    assert cfg.loss.beta > 0 and cfg.train.max_steps > 0


def test_research_defaults():
    sd15, sdxl = load_config(RECIPES[0].parents[1] / "sd15/lora_dpo.yaml"), load_config(RECIPES[0].parents[1] / "sdxl/lora_dpo.yaml")
    for cfg in (sd15, sdxl):
        assert (cfg.loss.beta, cfg.lora.r, cfg.optim.lr, cfg.optim.name) == (5000, 8, 1e-5, "adamw8bit")
        assert cfg.train.gradient_checkpointing and cfg.lora.lora_dropout == 0
    assert sd15.model.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sdxl.model.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (sd15.train.batch_size, sdxl.train.batch_size, sdxl.data.resolution) == (16, 8, 1024)


def test_official_full_finetune_launchers():
    root = RECIPES[0].parents[1]
    sd15, sdxl = load_config(root / "sd15/full_dpo.yaml"), load_config(root / "sdxl/full_dpo.yaml")
    for cfg, warmup, optim in ((sd15, 500, "adamw"), (sdxl, 200, "adafactor")):
        effective = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * 16  # 16 GPUs
        assert (cfg.train.mode, cfg.loss.beta, effective) == ("full", 5000, 2048)
        assert cfg.optim.lr == pytest.approx(1e-8 * effective)  # the launchers' --learning_rate 1e-8 --scale_lr
        assert (cfg.optim.lr_scheduler, cfg.optim.lr_warmup_steps, cfg.optim.name) == ("constant_with_warmup", warmup, optim)
        assert cfg.train.max_steps == 2000
    assert sdxl.train.gradient_checkpointing and sdxl.data.resolution == 1024


def test_reference_options_belong_to_full_mode():
    with pytest.raises(ConfigError, match="apply to train.mode=full"):
        load_config(None, ["reference.offload=true"])
    cfg = load_config(None, ["train.mode=full", "reference.dtype=bfloat16", "reference.offload=true"])
    assert (cfg.reference.dtype, cfg.reference.offload) == ("bfloat16", True)
    with pytest.raises(ConfigError, match="did you mean 'full'"):
        load_config(None, ["train.mode=ful"])


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=2e-5", "train.gradient_checkpointing=false", "lora.target_modules=[to_q, to_v]",
                             "train.resume_from=latest", "data.max_pairs=10"])
    assert cfg.optim.lr == 2e-5 and cfg.train.gradient_checkpointing is False
    assert cfg.lora.target_modules == ["to_q", "to_v"] and cfg.train.resume_from == "latest"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.nme=adamw", "unknown key 'optim.nme'; did you mean 'optim.name'?"),
        ("trian.max_steps=3", "unknown key 'trian'; did you mean 'train'?"),
        ("optim.name=adamw9bit", "did you mean 'adamw8bit'?"),
        ("train.max_steps=ten", "train.max_steps='ten'"),
        ("lora.r=0", "lora.r=0"),
        ("data.resolution=500", "multiple of 8"),
        ("train.mixed_precision=fp8", "must be one of"),
        ("max_steps=3", "must name a section"),
        ("train.max_steps", "section.key=value"),
    ],
)
def test_bad_input_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_cross_field_checks():
    """A warmup longer than the run and a resume of a recipe that sets output.overwrite are valid: notes, not
    errors (a short test run of a shipped recipe works; resuming follows the advice it is given)."""
    cfg = load_config(None, ["train.max_steps=10", "optim.lr_warmup_steps=50"])
    assert any("lr_warmup_steps=50 exceeds train.max_steps=10" in line for line in cfg.notes())
    cfg = load_config(None, ["train.resume_from=latest", "output.overwrite=true"])
    assert any("output.overwrite=true is ignored" in line for line in cfg.notes())
    with pytest.raises(ConfigError, match="optim.lr_scheduler=constant_with_warmup"):
        load_config(None, ["optim.lr_scheduler=constant", "optim.lr_warmup_steps=5"])


def test_missing_or_broken_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("lora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        load_config(typo)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["lora.r=4", "data.image_columns=[a, b]", "output.dir=/tmp/x"])
    path = tmp_path / "recipe.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.data.image_columns == ("a", "b")
    assert set(yaml.safe_load(cfg.to_yaml())) == set(RecipeConfig.model_fields)


def test_yaml_no_means_no(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n  gradient_checkpointing: yes\n")
    cfg = load_config(recipe)
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is True
    cfg = load_config(None, ["train.mixed_precision=no", "train.gradient_checkpointing=off"])
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is False

"""What a new user trips on first, answered with one line: offline hubs, launcher configs given as recipes, a recipe
for another family or precision the machine cannot run, short test runs, resuming, single values for lists, a bad
``generate`` argument, and shipped recipes run from another directory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import datasets
import diffusers
import pytest
from huggingface_hub import constants as hub_constants

from lora_dpo.cli import generate as generate_cli
from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.inference.generation import SCHEDULER_NAMES
from lora_dpo.models import pretrained
from lora_dpo.training import setup

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.fixture
def no_hub(monkeypatch):
    """No real network: every TCP connection attempt is counted and fails; the hub clients must not be called."""
    attempts = []

    def refuse(address, *args, **kwargs):  # counted: connections to the hub (others, e.g. pyarrow's S3, fail too)
        if address[0] == urlparse(hub_constants.ENDPOINT).hostname:
            attempts.append(address)
        raise OSError("network is unreachable")

    def never(*args, **kwargs):
        raise AssertionError("the hub client was called although the hub is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", classmethod(never))
    local_only = datasets.load_dataset

    def load_local(path, *args, **kwargs):  # builders (parquet, json, ...) read local files; a hub id must not come
        if "/" in str(path):
            never()
        return local_only(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_local)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    pretrained.hub_unreachable.cache_clear()
    yield attempts
    pretrained.hub_unreachable.cache_clear()


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_unreachable_hub_is_said_at_once(no_hub, tiny_sd15, photo_pairs, capsys):
    recipe = str(ROOT / "recipes/sd15/lora_dpo.yaml")
    assert main(["validate", recipe, "train.mixed_precision=no", f"data.dataset={photo_pairs}"]) == 2
    line = _one_error(capsys)
    assert "could not be reached" in line and "model.pretrained_model_name_or_path=/path/to/pipeline" in line
    assert len(no_hub) == 1  # one probe, no retries
    assert main(["validate", recipe, "train.mixed_precision=no", f"model.pretrained_model_name_or_path={tiny_sd15}"]) == 2
    line = _one_error(capsys)
    assert "data.dataset='yuvalkirstain/pickapic_v2'" in line and "data.dataset=/path/to/parquet" in line
    assert len(no_hub) == 1  # the probe's answer is kept for the process


def test_hf_hub_offline_tries_no_connection(no_hub, photo_pairs, capsys, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert main(["validate", str(ROOT / "recipes/sdxl/lora_dpo.yaml"), "train.mixed_precision=no",
                 f"data.dataset={photo_pairs}"]) == 2
    line = _one_error(capsys)
    assert "HF_HUB_OFFLINE is set" in line and "model.pretrained_model_name_or_path=/path/to/pipeline" in line
    assert no_hub == []


def test_a_bare_name_is_not_a_hub_id(no_hub, capsys):
    recipe = str(ROOT / "recipes/digits/lora_dpo.yaml")
    assert main(["validate", recipe, "data.dataset=mypairs", "--no-model"]) == 2
    line = _one_error(capsys)
    assert "data.dataset='mypairs' is neither a file or folder" in line and "org/name" in line
    assert no_hub == []


def test_validate_without_the_model(no_hub, photo_pairs, capsys):
    code = main(["validate", str(ROOT / "recipes/sd15/full_dpo.yaml"), f"data.dataset={photo_pairs}",
                 "data.resolution=32", "--no-model"])
    out = capsys.readouterr().out
    assert code == 0 and "not checked: --no-model" in out and no_hub == []


@pytest.mark.parametrize("launcher", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "ddp_multinode.yaml"])
def test_a_launcher_config_is_named_as_such(launcher, capsys):
    assert main(["validate", str(ROOT / "recipes/accelerate" / launcher)]) == 2
    line = _one_error(capsys)
    assert "accelerate launcher config" in line and "accelerate launch --config_file" in line


def test_recipe_of_another_family_warns(tiny_sd15, photo_pairs, capsys):
    assert main(["validate", str(ROOT / "recipes/sdxl/lora_dpo.yaml"), f"model.pretrained_model_name_or_path={tiny_sd15}",
                 f"data.dataset={photo_pairs}", "data.resolution=32", "train.mixed_precision=no",
                 "optim.name=adamw"]) == 0
    captured = capsys.readouterr()
    assert "recipe for SDXL but the model is SD1.x/2.x" in captured.err and "1 warning" in captured.out


def test_fp16_and_8bit_adamw_without_a_gpu(tiny_sd15, photo_pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(setup, "device_type", lambda: "cpu")
    base = [str(ROOT / "recipes/sd15/lora_dpo.yaml"), f"model.pretrained_model_name_or_path={tiny_sd15}",
            f"data.dataset={photo_pairs}", "data.resolution=32", f"output.dir={tmp_path / 'run'}"]
    for command in ("validate", "train"):
        assert main([command, *base]) == 2
        line = _one_error(capsys)
        assert "train.mixed_precision=fp16 needs a GPU" in line and "train.mixed_precision=no" in line
    assert not (tmp_path / "run").exists()
    assert main(["validate", *base, "train.mixed_precision=no"]) == 0
    assert "optim.name=adamw8bit on a machine without a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_validates_as_a_short_run(recipe, request, photo_pairs, capsys):
    folder = {"sdxl": "sdxl", "sd35": "sd3", "digits-sd3": "sd3", "flux": "flux"}.get(recipe.parent.name, "sd15")
    model = request.getfixturevalue(f"tiny_{folder}")
    code = main(["validate", str(recipe), "train.max_steps=2", f"model.pretrained_model_name_or_path={model}",
                 f"data.dataset={photo_pairs}", "data.resolution=32", "train.mixed_precision=no"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warmup = load_config(recipe).optim.lr_warmup_steps
    assert ("exceeds train.max_steps=2" in captured.err) == (warmup > 2)
    assert "recipe for" not in captured.err  # each recipe on a model of its own family


def test_short_run_then_resume_as_advised_from_another_folder(tmp_path, capsys, monkeypatch):
    """The digits recipe (relative paths into the repository) trained from another directory for 2 steps; the
    refusal to start over names train.resume_from=latest, and that advice works although the recipe sets
    output.overwrite=true."""
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes/digits/lora_dpo.yaml")
    run = ["output.dir=run", "train.batch_size=4", "train.checkpoint_every=1", "data.max_pairs=16"]
    assert main(["train", recipe, *run, "train.max_steps=2"]) == 0
    assert "exceeds train.max_steps=2" in capsys.readouterr().err
    assert main(["train", recipe, *run, "train.max_steps=2", "output.overwrite=false"]) == 2
    assert "train.resume_from=latest" in _one_error(capsys)
    assert main(["train", recipe, *run, "train.max_steps=3", "train.resume_from=latest"]) == 0
    assert "output.overwrite=true is ignored" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_relative_recipe_paths_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "recipes/digits/lora_dpo.yaml")
    assert Path(cfg.model.pretrained_model_name_or_path) == ROOT / "worlds/digits/pipeline"
    assert Path(cfg.data.dataset) == ROOT / "worlds/digits/prefs/train.parquet"
    cfg = load_config(ROOT / "recipes/digits/lora_dpo.yaml", ["data.dataset=worlds/digits/prefs/train.parquet"])
    assert cfg.data.dataset == "worlds/digits/prefs/train.parquet"  # an override is read from the current directory
    assert load_config(ROOT / "recipes/sd15/lora_dpo.yaml").data.dataset == "yuvalkirstain/pickapic_v2"  # a hub id


def test_single_values_and_precision_spellings():
    cfg = load_config(None, ["lora.target_modules=to_q", "train.mixed_precision=fp32"])
    assert cfg.lora.target_modules == ["to_q"] and cfg.train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=float16"]).train.mixed_precision == "fp16"
    assert load_config(None, ["train.mixed_precision=BF16"]).train.mixed_precision == "bf16"


def test_generate_argument_errors_answer_without_torch(tmp_path):
    (tmp_path / "run").mkdir()
    cases = [(["--adapter", f"{tmp_path / 'run'}:strong"], "scale 'strong' is not a number"),
             (["--adapter", f"{tmp_path / 'nope'}:0.5"], "not found"),
             (["--height", "100"], "multiple of 8")]
    for extra, message in cases:
        code = ("import sys; from lora_dpo.cli import main; "
                f"rc = main(['generate', {str(tmp_path)!r}, 'a cat', *{extra!r}]); "
                "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
        assert message in done.stderr and done.stderr.count("error:") == 1, done.stderr


def test_generate_scheduler_names_match_the_stage():
    assert generate_cli.SCHEDULER_NAMES == SCHEDULER_NAMES

"""``lora-dpo iterate``: rounds of sample → score → pair → train against the previous round → evaluate, on the tiny
SD1.5 pipeline; resume after a kill at any stage ends with the same bytes; bad input fails before sampling."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_dpo.cli import main
from lora_dpo.inference.sampling import fused_adapters, generate_images, load_pipeline
from lora_dpo.iterate import loop
from lora_dpo.models.lora_files import WEIGHT_NAME, load_adapter
from lora_dpo.models.policy import REFERENCE_LORA_FILE
from lora_dpo.world.demo import build_photo_pairs

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes/digits/iterate.yaml")
PROMPTS = ["a photo of a cat", "a rocket on a launch pad"]
N, GROUPS, STEPS = 4, 2, 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("iterate-inputs")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    heldout = build_photo_pairs(folder / "heldout.parquet", pairs_per_photo=1, size=48, seed=3)
    return folder / "prompts.txt", heldout


def _argv(model, inputs, out, *extra):
    prompts, heldout = inputs
    return [
        f"model.pretrained_model_name_or_path={model}", "data.resolution=32", f"output.dir={out}",
        "train.batch_size=2", f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.num_threads=1",
        "optim.lr=3e-2", "optim.lr_scheduler=constant", "optim.lr_warmup_steps=0", "output.tensorboard=false",
        f"iterate.candidates={N}", f"iterate.groups_per_prompt={GROUPS}", f"iterate.prompts={prompts}",
        "iterate.scorer=[jpeg]", "iterate.num_inference_steps=2", "iterate.eval_seeds_per_prompt=2",
        f"iterate.heldout_pairs={heldout}", "iterate.implicit_draws=2", "iterate.sample_batch_size=8", *extra,
    ]


@pytest.fixture(scope="module")
def two_rounds(tiny_sd15, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("iterate") / "run"
    assert main(["iterate", RECIPE, "--rounds", "2", *_argv(tiny_sd15, inputs, out)]) == 0
    return out


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_round_trains_against_the_previous_policy(two_rounds):
    """Round 1 starts from the base, round 2 from round 1's adapter, which is also its reference: the step-1 loss of
    every round is ln 2, round 2's reference file is round 1's adapter byte for byte, and the final adapter is round
    2's."""
    r1, r2 = two_rounds / "round_1", two_rounds / "round_2"
    for r in (r1, r2):
        assert _losses(r / "train")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert not (r1 / "train" / REFERENCE_LORA_FILE).exists()
    assert (r2 / "train" / REFERENCE_LORA_FILE).read_bytes() == (r1 / "train" / WEIGHT_NAME).read_bytes()
    assert (two_rounds / WEIGHT_NAME).read_bytes() == (r2 / "train" / WEIGHT_NAME).read_bytes()
    assert (r1 / "train" / WEIGHT_NAME).read_bytes() != (r2 / "train" / WEIGHT_NAME).read_bytes()


def test_round_two_samples_from_round_one(two_rounds, tiny_sd15):
    """Round 2's candidates come from the base plus round 1's adapter, from round 2's own seeds: the rows' images are
    re-sampled here, and they differ from what the base alone draws from those seeds."""
    rows = pq.read_table(two_rounds / "round_2" / "prefs.parquet").to_pylist()
    report = json.loads((two_rounds / "round_2" / "prefs.json").read_text())
    assert report["seed_range"] == [N * GROUPS, 2 * N * GROUPS] and report["sampled_from"].endswith("round_1/train")
    assert all(N * GROUPS <= row[key] < 2 * N * GROUPS for row in rows for key in ("seed_0", "seed_1"))
    row = rows[0]
    pipe = load_pipeline(tiny_sd15)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32)
    base = generate_images(pipe, [row["caption"]], [row["seed_0"]], **kwargs)[0]
    load_adapter(pipe, two_rounds / "round_1" / "train", "policy")
    with fused_adapters(pipe):
        policy = generate_images(pipe, [row["caption"]], [row["seed_0"]], **kwargs)[0]
    stored = np.asarray(Image.open(io.BytesIO(row["jpg_0"])).convert("RGB"))
    assert np.array_equal(stored, np.asarray(policy))
    assert not np.array_equal(stored, np.asarray(base))


def test_summary_table_and_figure(two_rounds):
    summary = json.loads((two_rounds / "iterate.json").read_text())
    rounds = summary["rounds"]
    assert [s["round"] for s in rounds] == [1, 2] and summary["settings"]["rounds"] == 2
    assert rounds == [json.loads((two_rounds / f"round_{r}" / "round.json").read_text()) for r in (1, 2)]
    assert rounds[0]["reference"] == "base" and rounds[1]["reference"].endswith("round_1/train")
    assert rounds[0]["vs_previous"] is None and rounds[1]["vs_previous"]["n_comparisons"] == 2 * len(PROMPTS)
    for s in rounds:
        eval_base = json.loads((two_rounds / f"round_{s['round']}" / "eval_base" / "eval.json").read_text())
        assert s["vs_base"]["win_rate"] == eval_base["win_rate"]
        assert s["vs_base"]["implicit_reward"]["reference"] == "base"
        assert s["prefs"]["pairs"] == len(pq.read_table(two_rounds / f"round_{s['round']}" / "prefs.parquet"))
    assert rounds[1]["vs_previous"]["implicit_reward"]["reference"] == "run"
    with Image.open(two_rounds / "iterate.png") as figure:
        assert figure.size[0] > 600


def test_the_final_adapter_loads_on_the_base_alone(two_rounds, tiny_sd15):
    """``pipe.load_lora_weights(run_dir)`` reads the last round's accumulated adapter: its weights are the trained
    ones, alpha included (the same images as the round's own folder)."""
    pipe = load_pipeline(tiny_sd15)
    pipe.load_lora_weights(str(two_rounds))
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32)
    final = generate_images(pipe, PROMPTS[:1], [123], **kwargs)[0]
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(two_rounds / "round_2" / "train"))
    assert np.array_equal(np.asarray(final), np.asarray(generate_images(pipe, PROMPTS[:1], [123], **kwargs)[0]))


def test_a_finished_run_resumes_to_more_rounds_and_refuses_another_recipe(two_rounds, tiny_sd15, inputs, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    shutil.copytree(two_rounds, out)  # a moved folder resumes as well
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("round_*/**/*") if p.is_file()}
    assert main(["iterate", RECIPE, "--rounds", "2", *_argv(tiny_sd15, inputs, out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # two finished rounds: nothing redone
    assert main(["iterate", RECIPE, "--rounds", "3", *_argv(tiny_sd15, inputs, out)]) == 0
    r3 = out / "round_3" / "train"
    assert (r3 / REFERENCE_LORA_FILE).read_bytes() == (out / "round_2" / "train" / WEIGHT_NAME).read_bytes()
    assert (out / WEIGHT_NAME).read_bytes() == (r3 / WEIGHT_NAME).read_bytes()
    assert _losses(r3)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert len(json.loads((out / "iterate.json").read_text())["rounds"]) == 3
    capsys.readouterr()
    assert main(["iterate", RECIPE, *_argv(tiny_sd15, inputs, out, "iterate.candidates=6")]) == 2
    assert "holds the rounds of another recipe" in capsys.readouterr().err
    (out / "round_2" / "train" / WEIGHT_NAME).write_bytes(b"not the adapter")
    assert main(["iterate", RECIPE, "--rounds", "3", *_argv(tiny_sd15, inputs, out)]) == 2
    assert "differs from the adapter round 2 finished with" in capsys.readouterr().err
    # output.overwrite starts over: the earlier rounds and results go, another recipe is welcome
    assert main(["iterate", RECIPE, "--rounds", "1",
                 *_argv(tiny_sd15, inputs, out, "iterate.candidates=6", "output.overwrite=true")]) == 0
    assert sorted(p.name for p in out.glob("round_*")) == ["round_1"]
    assert json.loads((out / "iterate.json").read_text())["settings"]["candidates"] == 6
    assert (out / WEIGHT_NAME).read_bytes() == (out / "round_1" / "train" / WEIGHT_NAME).read_bytes()


# ----------------------------------------------------------------------------------------------------------
# a kill at any stage resumes to the same bytes

# Runs the CLI with SIGKILL after the K-th call of one function (a stage of the loop), K from argv.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from lora_dpo.cli import main
    from lora_dpo.iterate import loop
    from lora_dpo.training import checkpoint as ckpt

    where, kill_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    owner = ckpt if where == "save_checkpoint" else loop
    original, calls = getattr(owner, where), []

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(where)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, where, counted)
    sys.exit(main(argv))
""")


@pytest.mark.parametrize("where, kill_at", [
    ("save_checkpoint", 3),  # round 2, after its step-2 checkpoint: resumes inside round 2's training
    ("build_candidate_set", 2),  # round 2's pairs written, before its report: sampled again, the same bytes
    ("evaluate_run", 1),  # round 1 trained, its evaluation half done
])
def test_a_killed_run_resumes_to_the_same_adapter(two_rounds, tiny_sd15, inputs, tmp_path, where, kill_at):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    argv = ["iterate", RECIPE, "--rounds", "2", *_argv(tiny_sd15, inputs, out)]
    killed = subprocess.run([sys.executable, str(driver), where, str(kill_at), *argv], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / WEIGHT_NAME).exists()
    resumed = subprocess.run([sys.executable, str(driver), where, "0", *argv], capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if where == "save_checkpoint":
        assert "resumed from" in resumed.stderr and "step_2" in resumed.stderr
    a, b = load_file(two_rounds / WEIGHT_NAME), load_file(out / WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in (1, 2):
        assert _losses(out / f"round_{r}" / "train") == _losses(two_rounds / f"round_{r}" / "train")
        assert (out / f"round_{r}" / "prefs.parquet").read_bytes() == \
            (two_rounds / f"round_{r}" / "prefs.parquet").read_bytes()


# ----------------------------------------------------------------------------------------------------------
# bad input: one error line before anything samples


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(loop, "load_pipeline", refuse)


def _table(path: Path) -> Path:
    path.write_text("id,text_prompt\n1,a cat\n")
    return path


@pytest.mark.parametrize("options, overrides, message", [
    ([], ["iterate.prompts=EMPTY"], "holds no prompt"),
    ([], ["iterate.prompts=TABLE", "iterate.prompt_column=prompt"], "text_prompt"),
    ([], ["iterate.scorer=[/no/such/scorer]"], "scorer '/no/such/scorer' not found"),
    ([], ["iterate.scorer=[PICKLE]"], "weights are only read from safetensors"),
    ([], ["iterate.scorer=[]"], "iterate.scorer is empty"),
    ([], ["iterate.candidates=1"], "iterate.candidates"),
    ([], ["iterate.pairing=top-bottom-k", "iterate.top_k=3"], "k <= candidates / 2 = 2"),
    ([], ["iterate.groups_per_prompt=3000"], "overlap the evaluation's seeds"),
    (["--rounds", "0"], [], "--rounds 0: give at least 1 round"),
    ([], ["iterate.rounds=0"], "iterate.rounds"),
    ([], ["train.mode=full", "optim.name=adamw"], "set train.mode=lora"),
])
def test_bad_input_fails_before_sampling(tiny_sd15, inputs, tmp_path, capsys, no_sampling, options, overrides,
                                         message):
    pickle_folder = tmp_path / "pickle-scorer"
    pickle_folder.mkdir()
    (pickle_folder / "config.json").write_text('{"model_type": "clip"}')
    (pickle_folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    names = {"EMPTY": tmp_path / "empty.txt", "TABLE": _table(tmp_path / "prompts.csv"), "PICKLE": pickle_folder}
    for key, value in names.items():
        overrides = [o.replace(key, str(value)) for o in overrides]
    code = main(["iterate", RECIPE, *options, *_argv(tiny_sd15, inputs, tmp_path / "run", *overrides)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("error:") == 1, err
    assert not (tmp_path / "run" / "round_1").exists()


def test_the_shipped_recipe_reads_from_any_directory(tmp_path, monkeypatch):
    """Run from elsewhere, the recipe's paths resolve into the repository, and the built-in names stay names (the
    folder recipes/digits is not the prompts 'digits')."""
    from lora_dpo.config import load_config

    monkeypatch.chdir(tmp_path)
    it = load_config(RECIPE).iterate
    assert it.prompts == "digits" and it.eval_prompts is None
    assert it.scorer == [str(ROOT / "worlds/digits/scorer")]
    assert it.heldout_pairs == str(ROOT / "worlds/digits/prefs/heldout.parquet")
    assert load_config(RECIPE, ["iterate.scorer=[jpeg]"]).iterate.scorer == ["jpeg"]


def test_demo_rounds_runs_the_iterate_recipe_on_the_digits_world(tmp_path, capsys):
    """``lora-dpo demo --rounds 1`` (made tiny by overrides) runs recipes/digits/iterate.yaml on the committed world:
    the digit scorer judges, so the table has accuracies and fixed / broken counts."""
    out = tmp_path / "demo"
    code = main(["demo", "--rounds", "1", f"output.dir={out}", "iterate.groups_per_prompt=1", "iterate.candidates=2",
                 "train.max_steps=2", "train.batch_size=2", "iterate.eval_seeds_per_prompt=1",
                 "iterate.implicit_draws=1", "iterate.num_inference_steps=2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "iterate.json").read_text())
    vs_base = summary["rounds"][0]["vs_base"]
    assert vs_base["n_comparisons"] == 10 and vs_base["accuracy_base"] is not None
    assert vs_base["fixed"] is not None and vs_base["implicit_reward"]["n_pairs"] == 200
    assert f"{vs_base['win_rate']:.3f}" in printed and str(out / "iterate.png") in printed

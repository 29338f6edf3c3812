"""Fault suite, training side: a diverging run never leaves a poisoned checkpoint called good, a run that cannot move
its weights says so, and bad input or a full disk is one ``error:`` line (exit 2), with the traceback kept for
``--debug`` / ``LORA_DPO_DEBUG=1``."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_dpo.cli import main
from lora_dpo.errors import ConfigError, CorruptFileError, UnsafeFileError
from lora_dpo.models.lora_files import read_lora_file, resolve_lora_file
from lora_dpo.training import checkpoint as ckpt
from lora_dpo.training.run_folder import MetricsLog

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes/sd15/lora_dpo.yaml")


def _args(model, data, out, *extra):
    return [
        f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}", "data.resolution=32",
        f"output.dir={out}", "train.batch_size=2", "train.max_steps=3", "train.checkpoint_every=1",
        "optim.name=adamw", "optim.lr=1e-3", "optim.lr_scheduler=constant", "output.tensorboard=false",
        "train.mixed_precision=no", *extra,
    ]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_huge_lr_sets_aside_the_checkpoint_whose_weights_diverged(tiny_sd15, photo_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", RECIPE, *_args(tiny_sd15, photo_pairs, out, "optim.lr=1e30", "optim.max_grad_norm=null",
                                         "train.max_steps=6")])
    assert code == 1
    err = capsys.readouterr().err
    # step 1 moved the weights to ~1e30 (finite, so step_1 was written); step 2's loss on them is not finite
    assert "at step 2" in err and "No good checkpoint is kept" in err
    assert ckpt.list_checkpoints(out) == [] and not (out / "checkpoints" / ckpt.LATEST).exists()
    rejected = [p for p in (out / "checkpoints").iterdir() if (p / "REJECTED.txt").is_file()]
    assert len(rejected) == 1 and "step 1" in (rejected[0] / "REJECTED.txt").read_text()
    weights = load_file(rejected[0] / "trainable_weights.safetensors")  # kept, not deleted: nothing is lost
    assert max(v.abs().max().item() for v in weights.values()) > 1e20
    assert main(["train", RECIPE, *_args(tiny_sd15, photo_pairs, out, "train.resume_from=latest")]) == 2
    assert "no checkpoint" in capsys.readouterr().err.lower()


def test_huge_beta_skips_nonfinite_steps_then_stops(tiny_sd15, photo_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", RECIPE, *_args(tiny_sd15, photo_pairs, out, "loss.beta=1e30", "train.max_steps=10",
                                         "train.stop_after_nonfinite_grads=3")])
    assert code == 1
    err = capsys.readouterr().err
    assert "NaN/Inf 3 steps in a row" in err and "Last good checkpoint" in err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(not torch.isfinite(torch.tensor(r["grad_norm"])) for r in rows)
    # every step was skipped: the checkpoints hold the starting adapter (LoRA B zero)
    for path in ckpt.list_checkpoints(out):
        weights = load_file(path / "trainable_weights.safetensors")
        assert all(torch.count_nonzero(v) == 0 for k, v in weights.items() if "lora_B" in k)


def test_a_run_that_never_moves_says_so(tiny_sd15, photo_pairs, tmp_path, caplog):
    out = tmp_path / "run"
    assert main(["train", RECIPE, *_args(tiny_sd15, photo_pairs, out, "loss.beta=1e30", "train.max_steps=2",
                                         "train.stop_after_nonfinite_grads=100")]) == 0
    assert any("never moved" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert _metrics(out)[-1]["diagnostics/weights_moved"] == 0.0
    assert "never moved" in (out / "README.md").read_text()
    moving = tmp_path / "moving"
    assert main(["train", RECIPE, *_args(tiny_sd15, photo_pairs, moving, "train.max_steps=2")]) == 0
    assert _metrics(moving)[-1]["diagnostics/weights_moved"] == 1.0
    assert "never moved" not in (moving / "README.md").read_text()


def test_full_disk_while_logging_is_one_error_line(tiny_sd15, photo_pairs, tmp_path, capsys, monkeypatch):
    def full(self, metrics, step):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(MetricsLog, "write", full)
    out = tmp_path / "run"
    assert main(["train", RECIPE, *_args(tiny_sd15, photo_pairs, out)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no space left" in lines[0] and str(out / "metrics.jsonl") in lines[0]


@pytest.mark.parametrize("value", ["[1", "{a: !!python/object:os.system x}", "a: b: c"])
def test_bad_override_value_is_one_error_line_or_a_traceback_under_debug(value, capsys, monkeypatch):
    assert main(["validate", RECIPE, f"train.max_steps={value}"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [err.strip()] and "train.max_steps" in err and "not valid YAML" in err
    with pytest.raises(ConfigError):
        main(["--debug", "validate", RECIPE, f"train.max_steps={value}"])
    monkeypatch.setenv("LORA_DPO_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["validate", RECIPE, f"train.max_steps={value}"])


def test_truncated_or_overrunning_safetensors_name_the_file(lora_sd15, tiny_sd15, photo_pairs, tmp_path, capsys):
    data = (lora_sd15 / "pytorch_lora_weights.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match="truncated.safetensors is truncated or corrupt"):
        read_lora_file(truncated)
    # a header whose offsets run past the end of the file: the last tensor's end moved out by 4 KiB
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    text = json.dumps(header).encode()
    overrun = tmp_path / "overrun.safetensors"
    overrun.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    with pytest.raises(CorruptFileError, match="overrun.safetensors"):
        read_lora_file(overrun)
    code = main(["train", RECIPE, *_args(tiny_sd15, photo_pairs, tmp_path / "run", f"lora.init_from={overrun}")])
    lines = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and "overrun.safetensors is truncated or corrupt" in lines[0]


def test_truncated_base_model_weights_name_the_file(tiny_sd15, photo_pairs, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    weights = model / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code = main(["train", RECIPE, *_args(model, photo_pairs, tmp_path / "run")])
    lines = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and f"{weights} is truncated or corrupt" in lines[0]


def test_pickle_conversion_hint_writes_a_new_file(lora_sd15, tmp_path):
    tensors = load_file(lora_sd15 / "pytorch_lora_weights.safetensors")
    disguised = tmp_path / "adapter.safetensors"
    torch.save(tensors, disguised)
    with pytest.raises(UnsafeFileError) as info:
        resolve_lora_file(disguised)
    assert f"'{tmp_path / 'adapter.converted.safetensors'}'" in str(info.value)
    pickle = tmp_path / "other.bin"
    torch.save(tensors, pickle)
    with pytest.raises(UnsafeFileError) as info:
        resolve_lora_file(pickle)
    assert f"'{tmp_path / 'other.safetensors'}'" in str(info.value)
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")  # taken: the hint must not overwrite it
    with pytest.raises(UnsafeFileError) as info:
        resolve_lora_file(pickle)
    assert f"'{tmp_path / 'other.converted.safetensors'}'" in str(info.value)

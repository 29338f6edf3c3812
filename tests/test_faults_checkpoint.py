"""Faults around the run folder: a process killed (SIGKILL) at any point of a checkpoint write, corrupt checkpoint
files, a full disk, two processes on one folder, a stale lock, a torn metrics line, half-deleted checkpoints. Each
one either resumes bit for bit or stops with one ``error:`` line naming the file."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_train import ROOT, _args, _metrics

from lora_dpo.cli import main
from lora_dpo.errors import CheckpointError, DiskFullError, RunFolderLocked
from lora_dpo.training import checkpoint as ckpt
from lora_dpo.training.run_folder import LOCK_FILE, RunLock, truncate_metrics

RECIPE = str(ROOT / "recipes/sd15/lora_dpo.yaml")
STEPS = 4
# Every checkpoint is saved, two are kept: the runs below write, rename and prune.
COMMON = ("train.checkpoint_every=1", "train.checkpoints_total_limit=2")
EVERY_KILL_POINT = "LORA_DPO_EVERY_KILL_POINT"
CHECKPOINT_FILES = ("trainable_weights.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.safetensors",
                    "rng_state.json", "trainer_state.json", "recipe.yaml", "manifest.json")

# Runs the CLI's train with the write primitives of lora_dpo.training.checkpoint counted; with KILL_AT >= 0 the
# process SIGKILLs itself at that call, before or after it runs. The calls are written to EVENTS at the end.
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the tests' process (conftest): the same kernels, the same bits
    from lora_dpo.cli import main
    from lora_dpo.training import checkpoint as ckpt

    kill_at, when, events_file, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    events = []
    PATH_ARG = {"save_safetensors": [1], "_torch_save": [1], "_write_text": [0], "_replace": [0, 1],
                "_write_manifest": [0], "_remove_tree": [0]}

    def counted(name, fn):
        def call(*args, **kwargs):
            index = len(events)
            events.append(name + " " + " ".join("/".join(str(args[i]).split("/")[-2:]) for i in PATH_ARG[name]))
            if index == kill_at and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*args, **kwargs)
            if index == kill_at and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return call

    for name in PATH_ARG:
        setattr(ckpt, name, counted(name, getattr(ckpt, name)))
    code = main(argv)
    with open(events_file, "w") as fh:
        json.dump(events, fh)
    sys.exit(code)
""")


def _train_argv(model, data, out, *extra):
    return ["train", RECIPE, *_args(model, data, out, *COMMON, f"train.max_steps={STEPS}", *extra)]


def _drive(tmp_path, argv, kill_at=-1, when="before"):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    events = tmp_path / "events.json"
    proc = subprocess.run([sys.executable, str(driver), str(kill_at), when, str(events), *argv],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    return proc, (json.loads(events.read_text()) if events.is_file() else None)


def _same_run(run_dir, reference):
    """The run ended with the reference's weights, bit for bit, and logged the same losses."""
    wa = load_file(reference / "pytorch_lora_weights.safetensors")
    wb = load_file(run_dir / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    a, b = _metrics(reference), _metrics(run_dir)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["rewards/margins"] for r in a] == [r["rewards/margins"] for r in b]


@pytest.fixture(scope="module")
def reference(tiny_sd15, photo_pairs, tmp_path_factory):
    """An uninterrupted run (in a subprocess, through the counting driver) and the write calls it made."""
    base = tmp_path_factory.mktemp("reference")
    proc, events = _drive(base, _train_argv(tiny_sd15, photo_pairs, base / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run", events


@pytest.fixture(scope="module")
def two_steps(tiny_sd15, photo_pairs, tmp_path_factory):
    """The same run stopped after 2 of its steps (checkpoints step_1 and step_2), to copy."""
    out = tmp_path_factory.mktemp("two") / "run"
    assert main(_train_argv(tiny_sd15, photo_pairs, out, "train.max_steps=2")) == 0
    return out


def _copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------------
# Killed while writing a checkpoint


def test_kill_during_a_checkpoint_write_then_resume_is_exact(reference, tiny_sd15, photo_pairs, tmp_path):
    """SIGKILL before or after each write primitive (file writes; manifest, renames and ``latest``; pruning), chosen
    by a seeded draw, one per group; resuming with ``latest`` then ends bit for bit as the uninterrupted run.
    ``LORA_DPO_EVERY_KILL_POINT=1`` tries every write call of the second checkpoint instead, before and after it."""
    ref_dir, events = reference
    assert any(e.startswith("_remove_tree checkpoints/.deleting-step_") for e in events)  # the runs prune
    groups = {"files": ("save_safetensors .tmp-step", "_torch_save .tmp-step", "_write_text .tmp-step"),
              "commit": ("_write_manifest", "_replace .tmp-step", "_replace checkpoints/.tmp-step",
                         "_write_text checkpoints/.latest", "_replace checkpoints/.latest"),
              "prune": ("_replace checkpoints/step_", "_remove_tree checkpoints/.deleting")}
    rng = random.Random(15)
    chosen = {group: rng.choice([(i, when) for i, e in enumerate(events) if e.startswith(prefixes)
                                 for when in ("before", "after")]) for group, prefixes in groups.items()}
    if os.environ.get(EVERY_KILL_POINT):  # every call of the second checkpoint's save, before and after (minutes)
        first, last = (next(i for i, e in enumerate(events) if f"step_{s}" in e) for s in (2, 3))
        chosen = {f"call{i}-{when}": (i, when) for i in range(first, last) for when in ("before", "after")}
    for group, (index, when) in chosen.items():
        case = tmp_path / group
        case.mkdir()
        proc, _ = _drive(case, _train_argv(tiny_sd15, photo_pairs, case / "run"), kill_at=index, when=when)
        assert proc.returncode == -signal.SIGKILL, (group, events[index], proc.stderr[-2000:])
        holder = json.loads((case / "run" / LOCK_FILE).read_text())
        assert holder["pid"] != os.getpid()  # the killed process's lock is left behind: it must not block
        # killed while writing the first checkpoint: nothing to resume, the run starts again
        resume = ["train.resume_from=latest"] if ckpt.list_checkpoints(case / "run") else []
        assert main(_train_argv(tiny_sd15, photo_pairs, case / "run", *resume)) == 0, (events[index], when)
        _same_run(case / "run", ref_dir)
        root = case / "run/checkpoints"
        assert (root / "latest").read_text() == f"step_{STEPS}" and not list(root.glob(".tmp-*")), events[index]
        # (killed while pruning at the last step, the resumed run has nothing to save: one more is kept until then)
        kept = [p.name for p in ckpt.list_checkpoints(case / "run")]
        assert kept[-2:] == [f"step_{STEPS - 1}", f"step_{STEPS}"] and len(kept) <= 3, (events[index], when, kept)


# ------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints


def test_a_corrupt_file_stops_an_explicit_resume_naming_it(two_steps, tiny_sd15, photo_pairs, tmp_path, capsys):
    run = _copy(two_steps, tmp_path)
    step = run / "checkpoints/step_2"
    for name in CHECKPOINT_FILES:
        original = (step / name).read_bytes()
        if name == "manifest.json":
            (step / name).write_bytes(original[: len(original) // 2])
        else:
            _flip_byte(step / name)
        capsys.readouterr()
        code = main(_train_argv(tiny_sd15, photo_pairs, run, f"train.resume_from={step}"))
        line = _error_line(capsys.readouterr().err)
        assert code == 2 and name in line and str(step) in line, (name, line)
        (step / name).write_bytes(original)
    (step / "trainer_state.json").write_text((step / "trainer_state.json").read_text() + " ")  # one byte longer
    capsys.readouterr()
    assert main(_train_argv(tiny_sd15, photo_pairs, run, f"train.resume_from={step}")) == 2
    assert "trainer_state.json has" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["trainable_weights.safetensors", "trainer_state.json"])
def test_latest_falls_back_past_a_corrupt_checkpoint(name, reference, two_steps, tiny_sd15, photo_pairs, tmp_path,
                                                      caplog):
    run = _copy(two_steps, tmp_path)
    _flip_byte(run / "checkpoints/step_2" / name)
    with caplog.at_level(logging.WARNING, logger="lora_dpo"):
        assert main(_train_argv(tiny_sd15, photo_pairs, run, "train.resume_from=latest")) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("skipping step_2" in m and name in m for m in warned), warned
    assert any("resuming from" in m and m.split("resuming from ")[1].startswith(str(run / "checkpoints/step_1"))
               for m in warned), warned
    _same_run(run, reference[0])


def test_no_checkpoint_verifies_lists_what_was_tried(two_steps, tiny_sd15, photo_pairs, tmp_path, capsys):
    run = _copy(two_steps, tmp_path)
    (run / "checkpoints/step_1/manifest.json").unlink()
    (run / "checkpoints/step_2/optimizer.pt").unlink()
    assert main(_train_argv(tiny_sd15, photo_pairs, run, "train.resume_from=latest")) == 2
    line = _error_line(capsys.readouterr().err)
    assert "step_2 (" in line and "optimizer.pt is missing" in line and "step_1 (" in line and "older" in line


# ------------------------------------------------------------------------------------------------------------
# One run per folder


def _hold_lock(folder: Path, command: str) -> subprocess.Popen:
    """A process that takes ``folder``'s lock and holds it until its stdin closes."""
    code = ("import sys; from lora_dpo.training.run_folder import RunLock\n"
            f"with RunLock({str(folder)!r}, command={command!r}):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_folder_refuses_a_second_process(tiny_sd15, photo_pairs, tmp_path, capsys):
    folder = tmp_path / "cache"
    holder = _hold_lock(folder, "cache")
    try:
        with pytest.raises(RunFolderLocked) as info, RunLock(folder):
            pass
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "lora-dpo cache" in message and "another folder" in message
        code = main(["cache", RECIPE, *_args(tiny_sd15, photo_pairs, tmp_path / "unused", "data.caption_dropout=0"),
                     "--out", str(folder)])
        assert code == 2 and f"pid {holder.pid}" in _error_line(capsys.readouterr().err)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with RunLock(folder, command="test"):  # released with its process
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not any(p.name.endswith(".arrow") for p in folder.rglob("*"))  # the refused build wrote nothing


def test_a_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    folder = tmp_path / "run"
    code = ("import os, signal; from lora_dpo.training.run_folder import RunLock\n"
            f"RunLock({str(folder)!r}).__enter__(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] not in (None, os.getpid())  # the dead one's
    with RunLock(folder) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with RunLock(folder, enabled=False):  # the other processes of a distributed run take nothing
        with RunLock(folder):
            pass


def test_a_second_training_run_on_a_folder_exits_at_once(tiny_sd15, photo_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_dpo.cli", *_train_argv(tiny_sd15, photo_pairs, out, "train.max_steps=10000",
                                                              "train.checkpoint_every=5000")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None
        started = time.perf_counter()
        assert main(_train_argv(tiny_sd15, photo_pairs, out, "train.max_steps=10000")) == 2
        line = _error_line(capsys.readouterr().err)
        assert f"pid {first.pid}" in line and "output.dir" in line
        assert time.perf_counter() - started < 30  # refused before any model loads
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143


# ------------------------------------------------------------------------------------------------------------
# Torn metrics line, half-deleted checkpoints


def test_a_torn_metrics_line_and_half_deleted_checkpoints_do_not_stop_resume(reference, two_steps, tiny_sd15,
                                                                               photo_pairs, tmp_path, caplog):
    run = _copy(two_steps, tmp_path)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss": 0.69')  # the run died while writing it
    half = run / "checkpoints/.deleting-step_0"  # pruning stopped midway
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"\0" * 10)
    (run / "checkpoints/step_7").mkdir()  # an empty step folder: not a checkpoint
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_1", "step_2"]
    with caplog.at_level(logging.WARNING, logger="lora_dpo"):
        assert main(_train_argv(tiny_sd15, photo_pairs, run, "train.resume_from=latest")) == 0
    assert any("metrics.jsonl" in r.getMessage() and "line 3" in r.getMessage() for r in caplog.records)
    _same_run(run, reference[0])  # every line parses again
    assert not half.exists() and (run / "checkpoints/latest").read_text() == f"step_{STEPS}"


def test_an_unparsable_metrics_line_before_the_last_names_it(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: .*fix or delete that line"):
        truncate_metrics(path, 5)
    path.write_text('{"step": 1}\n{"step": 2}\n\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 1}\n' and "line 4" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# The checkpoint functions on a small model (no pipeline)


def _state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def _save(run_dir, step, total_limit=None):
    model, optimizer, scheduler = _state()
    return ckpt.save_checkpoint(run_dir, step, weights=model.state_dict(), optimizer=optimizer,
                                lr_scheduler=scheduler, scaler=None, trainer_state={"epoch": 0, "batch_in_epoch": step},
                                recipe_yaml="train: {}\n", total_limit=total_limit)


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda p: (p / "manifest.json").unlink(), "no manifest.json: it is incomplete"),
    (lambda p: (p / "manifest.json").write_text("{\"format\": 1, \"fi"), "manifest.json cannot be parsed"),
    (lambda p: (p / "manifest.json").write_text("[]"), "manifest.json is not a lora-dpo manifest"),
    (lambda p: (p / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda p: (p / "rng_state.json").write_text((p / "rng_state.json").read_text() + "\n"), "rng_state.json has"),
    (lambda p: _flip_byte(p / "optimizer.pt"), "the SHA-256 of optimizer.pt differs"),
], ids=["no-manifest", "torn-manifest", "not-a-manifest", "missing-file", "size", "sha256"])
def test_verify_checkpoint_names_the_checkpoint_and_the_file(tmp_path, damage, expected):
    path = _save(tmp_path, 1)
    ckpt.verify_checkpoint(path)
    damage(path)
    with pytest.raises(CheckpointError, match="step_1") as info:
        ckpt.verify_checkpoint(path)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert ckpt.last_good_checkpoint(tmp_path) is None


@pytest.mark.parametrize(("name", "content"), [
    ("trainer_state.json", b'{"epoch": 0'), ("trainer_state.json", b'{"epoch": 0}'),
    ("trainable_weights.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),
    ("optimizer.pt", b"PK\x03\x04 not a zip"), ("scheduler.pt", b"nonsense"),
    ("rng_state.json", b'{"numpy": [1]}'), ("rng_state.safetensors", b"\x00" * 16),
], ids=["trainer-state-torn", "trainer-state-no-step", "weights", "optimizer", "scheduler", "rng-json", "rng-tensors"])
def test_unreadable_files_that_match_their_manifest_raise_checkpoint_error(tmp_path, name, content):
    path = _save(tmp_path, 1)
    (path / name).write_bytes(content)
    ckpt._write_manifest(path, 1)  # as if written so: the manifest agrees, the reading fails
    _, optimizer, scheduler = _state()
    with pytest.raises(CheckpointError, match=rf"step_1: cannot restore from {name}") as info:
        ckpt.load_checkpoint(path, optimizer=optimizer, lr_scheduler=scheduler, scaler=None)
    assert "\n" not in str(info.value)


def test_load_checkpoint_restores_the_state(tmp_path):
    random.seed(5)
    path = _save(tmp_path, 3)
    expected = torch.rand(3), random.random()  # the draws that follow the saved RNG states
    model, optimizer, scheduler = _state()
    saved = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].zero_()
    torch.manual_seed(99)
    random.seed(99)
    weights, state = ckpt.load_checkpoint(path, optimizer=optimizer, lr_scheduler=scheduler, scaler=None)
    assert state["step"] == 3 and state["batch_in_epoch"] == 3
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


@pytest.mark.parametrize("how", ["safetensors", "torch"])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, how):
    _save(tmp_path, 1)
    if how == "safetensors":  # safetensors reports the OS error in its message only
        def full(tensors, path, *args, **kwargs):
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        monkeypatch.setattr(ckpt, "save_safetensors", full)
    else:
        def full(obj, path):
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ckpt, "_torch_save", full)
    with pytest.raises(DiskFullError) as info:
        _save(tmp_path, 2)
    message = str(info.value)
    assert str(tmp_path / "checkpoints") in message and "bytes) are free" in message and "needs about" in message
    assert info.value.errno == errno.ENOSPC and "(step_1)" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_1"]
    assert (tmp_path / "checkpoints/latest").read_text() == "step_1"
    ckpt.verify_checkpoint(tmp_path / "checkpoints/step_1")


def test_a_crash_while_pruning_leaves_nothing_that_looks_like_a_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, total_limit=2)
    _save(tmp_path, 2, total_limit=2)
    remove = ckpt._remove_tree

    def crash(path):
        if path.name == ".deleting-step_1" and path.exists():
            (path / "optimizer.pt").unlink()  # half removed, then the process dies
            raise KeyboardInterrupt
        remove(path)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(ckpt, "_remove_tree", crash)
        _save(tmp_path, 3, total_limit=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_2", "step_3"]
    assert (root / ".deleting-step_1").is_dir() and (root / "latest").read_text() == "step_3"
    assert ckpt.resolve_resume("latest", tmp_path) == root / "step_3"
    _save(tmp_path, 4, total_limit=2)  # the next save removes the leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_3", "step_4"]


def test_resolve_resume_latest_skips_what_does_not_verify(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve_resume("latest", tmp_path)
    for step in (1, 2, 3):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step_9")  # a pointer to nothing: the others, newest first
    (root / "step_3/manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("latest", tmp_path) == root / "step_2"
    assert "skipping step_9" in caplog.text and "skipping step_3" in caplog.text and "resuming from" in caplog.text
    caplog.clear()
    (root / "latest").write_text("step_2")
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("latest", tmp_path) == root / "step_2"
    assert not caplog.text  # the pointer's target verifies: nothing to say
    with pytest.raises(CheckpointError, match="step_3 has no manifest.json"):
        ckpt.resolve_resume(str(root / "step_3"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ckpt.resolve_resume(str(root / "step_8"), tmp_path)


def test_quarantine_sets_a_checkpoint_aside_and_repoints_latest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    _flip_byte(root / "step_2/optimizer.pt")
    assert ckpt.last_good_checkpoint(tmp_path) == root / "step_3"
    aside = ckpt.quarantine_checkpoint(tmp_path, 3, "loss is nan at step 4")
    assert aside == root / "rejected-step_3" and "loss is nan" in (aside / "REJECTED.txt").read_text()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_1", "step_2"]
    assert (root / "latest").read_text() == "step_1"  # step_2 does not verify
    assert ckpt.last_good_checkpoint(tmp_path) == root / "step_1"
    assert ckpt.quarantine_checkpoint(tmp_path, 3, "again") is None
    _save(tmp_path, 3)
    assert ckpt.quarantine_checkpoint(tmp_path, 3, "again") == root / "rejected-step_3-1"
    ckpt.quarantine_checkpoint(tmp_path, 1, "bad")
    assert not (root / "latest").exists() and ckpt.last_good_checkpoint(tmp_path) is None

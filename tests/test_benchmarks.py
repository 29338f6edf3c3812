"""The step-cost benchmark runs on the tiny architectures (a smoke test of its output, not of its timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_cost_reports_every_mode(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/step_cost.py"), "--arch", "tiny", "--pairs", "2", "--steps", "1",
         "--warmup", "1", "--optim", "adamw", "adafactor", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["optim"]) for r in rows] == [
        (m, o) for m in ("lora-dpo", "lora-sft", "full-dpo", "full-sft") for o in ("adamw", "adafactor")]
    for r in rows:
        assert "error" not in r, r
        assert r["images_through_unet"] == 4 and r["step_time_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["flops_per_step"] > 0 and len(r["step_times_s"]) == 1
    by = {(r["mode"], r["optim"]): r for r in rows}
    # LoRA trains a sliver of the UNet; full mode trains all of it
    assert by["lora-dpo", "adamw"]["trainable_params_m"] < 0.1 * by["full-dpo", "adamw"]["trainable_params_m"]
    assert by["full-dpo", "adamw"]["trainable_params_m"] == by["full-dpo", "adamw"]["unet_params_m"]
    # counted FLOPs: a DPO step adds the reference forward to the SFT step on the same 4 images
    assert by["lora-dpo", "adamw"]["flops_per_step"] > by["lora-sft", "adamw"]["flops_per_step"]
    assert by["lora-dpo", "adamw"]["pairs_per_second"] > 0 and by["lora-sft", "adamw"]["pairs_per_second"] is None
    assert "| tiny | full-dpo | images | adafactor |" in proc.stdout and "LoRA-DPO / LoRA-SFT memory" in proc.stdout


def test_step_cost_from_a_cache_runs_no_encoder_and_no_reference(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/step_cost.py"), "--arch", "tiny", "--pairs", "2", "--steps", "1",
         "--warmup", "1", "--mode", "lora-dpo", "lora-sft", "--data", "images", "cache", "cache+ref",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {(r["mode"], r["data"]): r for r in json.loads(out.read_text())}
    flops = {k: r["flops_per_step"] for k, r in by.items()}
    # the cache drops the VAE and text-encoder FLOPs; the precomputed reference drops the reference forward, so
    # LoRA-DPO then costs what LoRA-SFT costs on the same 4 images
    assert flops["lora-dpo", "cache"] < flops["lora-dpo", "images"]
    assert flops["lora-dpo", "cache+ref"] < flops["lora-dpo", "cache"]
    assert flops["lora-dpo", "cache+ref"] == flops["lora-sft", "cache"]
    assert "from the cache / from images" in proc.stdout and "precomputed reference / LoRA-SFT" in proc.stdout


def test_checkpoint_cost_reports_save_manifest_and_verify(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/checkpoint_cost.py"), "--arch", "tiny", "--repeats", "1",
         "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"lora", "full"}
    for r in rows.values():  # the manifest is part of the save; a verified checkpoint has a size
        assert 0 < r["manifest_s"] <= r["save_s"] and r["verify_s"] > 0 and r["checkpoint_gb"] > 0
    assert rows["full"]["checkpoint_gb"] > 10 * rows["lora"]["checkpoint_gb"]
    assert [p.name for p in tmp_path.iterdir()] == ["cost.json"]  # its temporary folder is gone


def test_step_cost_flow_transformer_from_a_cache_with_a_quantized_base(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/step_cost.py"), "--arch", "tiny-flux", "--pairs", "1", "--steps", "1",
         "--warmup", "1", "--mode", "lora-dpo", "--data", "cache", "--quantization", "nf4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert "error" not in row and row["quantization"] == "nf4" and row["flops_per_step"] > 0
    # the transformer alone was built (no VAE, no text encoder) and its block weights are in 4 bits
    assert not row["encoders_built"] and 0 < row["weight_bytes"] < row["bf16_weight_bytes"]
    assert "| tiny-flux | lora-dpo | cache | adamw |" in proc.stdout and "| nf4 |" in proc.stdout
    assert "nf4 base (other weights fp32): weights / bf16 weights" in proc.stdout


def test_step_cost_refuses_what_it_cannot_build():
    def refusal(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/step_cost.py"), *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        return proc.stderr

    assert "trains from a cache only" in refusal("--arch", "sd3", "--mode", "lora-dpo")  # no T5-XXL built
    assert "freezes the base" in refusal("--arch", "tiny-sd3", "--quantization", "nf4")  # full modes by default
    assert "flow transformers" in refusal("--arch", "tiny", "--mode", "lora-dpo", "--quantization", "int8")

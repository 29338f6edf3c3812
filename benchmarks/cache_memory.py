"""Does building the latent cache stream? Peak memory of ``lora-dpo cache`` for growing numbers of pairs.

Writes a synthetic Pick-a-Pic set of N pairs (random 64 px JPEGs, 10% ties; parquet files of 1,000 pairs, as on the
hub), then builds the cache of the tiny
SD1.5 pipeline for it in a fresh process per N and reports that process's peak resident memory (``VmHWM``), the
build time and the cache size on disk, with the peak split into anonymous (heap) and file-backed (memory-mapped
Arrow / parquet) pages by a sampling thread. Memory should stay flat as N grows: a shard at a time is held.
Two ways to read the source: ``map`` (``datasets.load_dataset`` converts the parquet to an Arrow file first, then the
kept rows are indexed) and ``stream`` (``data.streaming=true``: row groups are read as the build goes). The peak so far
is also recorded after each shard: the allocator settles over the first two shards, so a set of one shard would
understate the steady peak; the default 250 pairs a shard gives 1,000 pairs four shards.

    python benchmarks/cache_memory.py --pairs 1000 10000 --json benchmarks/results/cache_memory_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def write_pairs(folder: Path, n: int, seed: int = 0, per_file: int = 1000) -> None:
    """N synthetic pairs as hub-style parquet shards of ``per_file`` pairs (``train-00000-of-00010.parquet``, ...),
    the layout of Pick-a-Pic on the hub: a reader holds one file's buffers at a time, so the input's file size, not
    the number of pairs, sets what reading it costs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
        return buf.getvalue()

    folder.mkdir(parents=True, exist_ok=True)
    files = -(-n // per_file)
    for f, start in enumerate(range(0, n, per_file)):
        k = min(per_file, n - start)
        table = pa.table({"caption": [f"pair {start + i}" for i in range(k)], "jpg_0": [jpeg() for _ in range(k)],
                          "jpg_1": [jpeg() for _ in range(k)],
                          "label_0": [0.5 if (start + i) % 10 == 0 else float((start + i) % 2) for i in range(k)]})
        pq.write_table(table, folder / f"train-{f:05d}-of-{files:05d}.parquet")


def worker(model: str, data: str, out: str, shard_size: int, mode: str) -> dict:
    import lora_dpo.training.cache_build
    from lora_dpo.config import load_config
    from lora_dpo.training.cache_build import build_cache
    from lora_dpo.training.memory import proc_status_gb

    after_shard = []  # the peak so far after each pair shard is written: flat when a shard at a time is held
    save_shard = lora_dpo.training.cache_build._save_shard

    def traced(out_dir, name, *args, **kwargs):
        save_shard(out_dir, name, *args, **kwargs)
        if name.startswith("shard_"):
            after_shard.append(round(proc_status_gb("VmHWM"), 3))

    lora_dpo.training.cache_build._save_shard = traced

    cfg = load_config(None, [f"model.pretrained_model_name_or_path={model}", f"data.dataset={data}",
                             "data.resolution=32", f"data.streaming={mode == 'stream'}"])
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:  # the peak RSS split into heap (anonymous) and file-backed (memory-mapped) pages
        while not done.wait(0.02):
            for key in peaks:
                peaks[key] = max(peaks[key], proc_status_gb(key) or 0.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    manifest = build_cache(cfg, out, shard_size=shard_size, batch_size=32, progress=False)
    done.set()
    sampler.join()
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"pairs_kept": manifest["pairs"], "shards": len(manifest["shards"]), "seconds": time.perf_counter() - t0,
            "peak_rss_gb": proc_status_gb("VmHWM"), "disk_mb": size / 2**20,
            # at the end: heap and anonymous memory vs file-backed (memory-mapped Arrow / parquet) pages
            "end_rss_anon_gb": proc_status_gb("RssAnon"), "end_rss_file_gb": proc_status_gb("RssFile"),
            "peak_rss_anon_gb": peaks["RssAnon"], "peak_rss_file_gb": peaks["RssFile"],
            "peak_after_each_shard_gb": after_shard}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--modes", nargs="+", choices=["map", "stream"], default=["map", "stream"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, data, out, shard, mode = args.worker
        print(json.dumps(worker(model, data, out, int(shard), mode)))
        return
    from lora_dpo.models.archs import save_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_pipeline(Path(tmp) / "tiny", "sd15")
        for n in args.pairs:
            data = Path(tmp) / f"pairs_{n}"
            write_pairs(data, n)
            for mode in args.modes:
                proc = subprocess.run([sys.executable, __file__, "--worker", str(model), str(data),
                                       str(Path(tmp) / f"c{n}-{mode}"), str(args.shard_size), mode],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                rows.append({"pairs": n, "mode": mode, **json.loads(proc.stdout.strip().splitlines()[-1])})
                print(f"{n} pairs, {mode}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print("| source | pairs | kept | shards | peak RSS (GiB) | peak after shard 1 / 2 / last | peak anonymous / "
          "file-backed (GiB, sampled) | at the end | build time (s) | cache on disk (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        trace = r["peak_after_each_shard_gb"]
        shown = " / ".join(f"{trace[i]:.2f}" for i in sorted({0, min(1, len(trace) - 1), len(trace) - 1}))
        print(f"| {r['mode']} | {r['pairs']} | {r['pairs_kept']} | {r['shards']} | {r['peak_rss_gb']:.2f} | {shown} | "
              f"{r['peak_rss_anon_gb']:.2f} / {r['peak_rss_file_gb']:.2f} | "
              f"{r['end_rss_anon_gb']:.2f} / {r['end_rss_file_gb']:.2f} | {r['seconds']:.0f} | {r['disk_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

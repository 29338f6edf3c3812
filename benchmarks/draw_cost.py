"""What the keyed per-pair draws (``lora_dpo/draws.py``) cost per micro-batch: one CPU generator per pair, drawing
both images' posterior samples, the pair's noise and timestep, then the copy to the device.

A step of LoRA-DPO on the real architectures takes seconds on this CPU and about a second on a GPU
(``benchmarks/step_cost.py``); this prints the draws' share of it.

    python benchmarks/draw_cost.py                 # SD1.5 512 px × 8 pairs, SDXL 1024 px × 4 pairs
    python benchmarks/draw_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch

    from lora_dpo.data.draws import TRAIN_SALT, draw_seed, pair_draws

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, latent, pairs in (("sd15 512 px", (4, 64, 64), 8), ("sdxl 1024 px", (4, 128, 128), 4)):
        times = []
        for r in range(args.repeats):
            seeds = [draw_seed(TRAIN_SALT, 0, r, i) for i in range(pairs)]
            t0 = time.perf_counter()
            eps, noise, t = pair_draws(seeds, latent, 1000, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append({"setting": name, "pairs": pairs, "device": str(device), "threads": torch.get_num_threads(),
                     "median_ms": 1e3 * statistics.median(times), "numbers_drawn": eps.numel() + noise.numel()})
    print("| setting | pairs per micro-batch | draws (numbers) | median time (ms) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['pairs']} | {r['numbers_drawn']:,} | {r['median_ms']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

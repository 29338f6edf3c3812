"""What a lower-precision frozen reference costs in accuracy: the step-0 implicit reward of full fine-tuning.

At step 0 the policy equals the base model, so with an exact reference u = 0 for every pair, the loss is ln 2 and
``rewards/accuracies`` (fraction of u > 0) is 0. A reference copy stored in bf16/fp16 computes slightly different
errors, and β multiplies the difference: this measures that noise floor on the digits world (a real trained UNet),
one step of 128 pairs, for each (mixed precision, reference dtype) and β. For small u,
-log σ(u) ≈ ln 2 - u/2 + u²/8, so sqrt(8 × (loss - ln 2 + mean u / 2)) estimates the per-pair rms of u.

    python benchmarks/reference_precision.py
"""

from __future__ import annotations

import math
import tempfile

import torch
from accelerate.state import AcceleratorState, PartialState

from lora_dpo.config import load_config
from lora_dpo.training.recipe import train

CASES = [("no", "float32"), ("no", "bfloat16"), ("no", "float16"), ("bf16", "float32"), ("bf16", "bfloat16")]


def main() -> None:
    torch.set_num_threads(1)
    print("| mixed precision | reference dtype | β | loss − ln 2 | rewards/margins (mean u) | rewards/accuracies | "
          "≈ rms of u |")
    print("|---|---|---|---|---|---|---|")
    for precision, dtype in CASES:
        for beta in (250, 5000):
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config("recipes/digits/lora_dpo.yaml", [
                    "train.mode=full", f"train.mixed_precision={precision}", f"reference.dtype={dtype}",
                    f"loss.beta={beta}", "train.max_steps=1", "optim.lr_warmup_steps=0", "train.batch_size=128",
                    f"output.dir={out}", "output.tensorboard=false",
                ])
                m = train(cfg).final_metrics
            AcceleratorState._reset_state(reset_partial_state=True)  # the next case may change mixed precision
            PartialState._reset_state()
            excess, mean_u = m["loss"] - math.log(2), m["rewards/margins"]
            rms = math.sqrt(max(8 * (excess + mean_u / 2), 0))
            print(f"| {precision} | {dtype} | {beta} | {excess:.2g} | {mean_u:.2g} | {m['rewards/accuracies']:.3f} | "
                  f"{rms:.2g} |", flush=True)


if __name__ == "__main__":
    main()

"""``lora-dpo eval``: the tuned model against its base on held-out seeds (win rate, accuracy, diversity), the
implicit-reward accuracy, statistics and figures. See ARCHITECTURE.md."""

from __future__ import annotations

from lora_dpo.evaluation.figures import plot_training_curves
from lora_dpo.evaluation.implicit_reward import implicit_reward_accuracy
from lora_dpo.evaluation.report import format_summary
from lora_dpo.evaluation.run import evaluate_run
from lora_dpo.evaluation.stats import wilson_interval, win_rate

__all__ = [
    "evaluate_run",
    "format_summary",
    "implicit_reward_accuracy",
    "plot_training_curves",
    "wilson_interval",
    "win_rate",
]

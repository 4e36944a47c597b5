"""Stopping a run whose loss went wrong, with the step it went wrong at and what to change: a loss that stays
above `loss_watchdog_threshold` for `loss_watchdog_patience` steps (axolotl's watchdog), or one that is not a
finite number. The last checkpoint is kept either way (the trainer saves nothing between the step that went
wrong and this check, which may run a step or two after it: worker/train/step_queue.py)."""

from __future__ import annotations

import math

from schemas.config import TrainingConfig
from worker.errors import TrainingError


class LossGuard:
    def __init__(self, cfg: TrainingConfig):
        self.threshold = cfg.loss_watchdog_threshold
        self.patience = cfg.loss_watchdog_patience or 3
        self.high_steps = 0  # consecutive steps above the threshold

    def check(self, step: int, loss: float) -> None:
        self.high_steps = self.high_steps + 1 if self.threshold is not None and loss > self.threshold else 0
        if self.high_steps >= self.patience:
            raise TrainingError(
                f"the loss stayed above loss_watchdog_threshold {self.threshold} "
                f"for {self.high_steps} steps (last {loss:.4f} at step {step})",
                hint="lower learning_rate or raise warmup; the last checkpoint is kept",
            )
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at step {step}",
                hint="lower learning_rate, or set max_grad_norm (e.g. 1.0)",
            )

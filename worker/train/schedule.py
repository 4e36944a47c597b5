"""When to stop, evaluate and save: pure arithmetic on the config and the epoch length.

Step counts follow axolotl: max_steps wins over num_epochs (which may be fractional);
eval_steps / save_steps are a step count, or a fraction (≤ 1) of the total steps;
evals_per_epoch / saves_per_epoch divide an epoch. Without any save key a checkpoint is written
at the end of each epoch, and `save_strategy: no` writes none (SIGTERM still saves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from schemas.config import TrainingConfig


def _every(value: int | float | None, per_epoch: int | None, total: int, steps_per_epoch: int) -> int | None:
    if value is not None:
        return max(1, math.ceil(value * total)) if isinstance(value, float) and value <= 1 else max(1, int(value))
    if per_epoch is not None:
        return max(1, steps_per_epoch // per_epoch)
    return None


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    eval_every: int | None
    save_every: int | None
    save_best: bool

    @classmethod
    def from_config(cls, cfg: TrainingConfig, steps_per_epoch: int, has_eval: bool) -> Schedule:
        total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
        eval_every = None
        if has_eval and cfg.eval_strategy != "no":
            if cfg.eval_strategy == "epoch":
                eval_every = steps_per_epoch
            else:
                eval_every = _every(cfg.eval_steps, cfg.evals_per_epoch, total, steps_per_epoch)
        if cfg.save_strategy in ("no", "best"):
            save_every = None
        elif cfg.save_strategy == "epoch":
            save_every = steps_per_epoch
        else:
            save_every = _every(cfg.save_steps, cfg.saves_per_epoch, total, steps_per_epoch) or steps_per_epoch
        if cfg.save_strategy == "best" and eval_every is None and has_eval:
            eval_every = steps_per_epoch
        return cls(total, steps_per_epoch, eval_every, save_every, cfg.save_strategy == "best")

    def eval_due(self, step: int) -> bool:
        return self.eval_every is not None and step % self.eval_every == 0 and step < self.total_steps

    def save_due(self, step: int) -> bool:
        """The last step is not checkpointed: the run's results are written right after it."""
        return self.save_every is not None and step % self.save_every == 0 and step < self.total_steps

"""The loss checks the trainer runs on every step it reads back (worker/train/loss_guard.py): the watchdog counts
consecutive steps above its threshold and forgets them at the first one below; a loss that is not a number stops
the run at once, threshold or not; each error names the step and what to change."""

from __future__ import annotations

import math

import pytest

from tests.train.test_units import cfg
from worker.errors import TrainingError
from worker.train.loss_guard import LossGuard


def test_the_watchdog_fires_after_its_patience_of_consecutive_high_steps():
    guard = LossGuard(cfg(loss_watchdog_threshold=2.0, loss_watchdog_patience=3))
    for step, loss in enumerate([2.5, 2.6, 1.9, 2.7, 2.8], start=1):  # the dip at step 3 resets the count
        guard.check(step, loss)
    with pytest.raises(
        TrainingError, match=r"above loss_watchdog_threshold 2.0 for 3 steps \(last 2.9000 at step 6\)"
    ) as e:
        guard.check(6, 2.9)
    assert "lower learning_rate" in e.value.hint


def test_patience_defaults_to_three_and_no_threshold_never_fires():
    guard = LossGuard(cfg(loss_watchdog_threshold=1.0))
    guard.check(1, 5.0)
    guard.check(2, 5.0)
    with pytest.raises(TrainingError, match="for 3 steps"):
        guard.check(3, 5.0)
    unwatched = LossGuard(cfg())
    for step in range(1, 20):
        unwatched.check(step, 1e6)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_loss_that_is_not_a_number_stops_the_run_at_its_step(loss):
    with pytest.raises(TrainingError, match=f"the loss became {loss} at step 7") as e:
        LossGuard(cfg()).check(7, loss)
    assert "max_grad_norm" in e.value.hint

"""Where a job's time to its first optimizer step goes, from the train child's events.

A user pays for every second before training starts; `timings.first_step_s` says how many there were
and these parts say where they went, in order (each a duration; together with the stages before
training they add up to `first_step_s`):

  train_startup_s       the train stage started → its child began loading the model (the process
                        forked or started, its imports, distributed set-up, the prepared data read)
  model_setup_s         → the model was ready (tokenizer, weights onto the device, adapter, kernels,
                        optimizer, a resumed checkpoint)
  first_step_compute_s  → the first optimizer step was done (the first micro-batches, CUDA's lazy
                        set-up and kernel compilation included)
"""

from __future__ import annotations

import time
from typing import Any

# the train child's events that end each part (worker/train/child.py, worker/train/trainer.py)
PARTS = (("loading", "train_startup_s"), ("ready", "model_setup_s"), ("first_step", "first_step_compute_s"))
MARKS = {event for event, _ in PARTS}


class FirstStepClock:
    def __init__(self, job_started_wall: float):
        self.job_started_wall = job_started_wall
        self.marks: dict[str, float] = {}  # event → wall time; the first of each counts (a retried stage adds none)

    def train_started(self) -> None:
        self.marks.setdefault("train", time.time())

    def observe(self, stage: str, event: dict[str, Any]) -> dict[str, float]:
        """The timings this event settles (none for most events)."""
        name, ts = event.get("event"), event.get("ts")
        if stage != "train" or name not in MARKS or not isinstance(ts, (int, float)) or name in self.marks:
            return {}
        self.marks[name] = float(ts)
        timings = {}
        if name == "first_step":
            timings["first_step_s"] = round(max(ts - self.job_started_wall, 0.0), 3)
        before = "train"
        for mark, key in PARTS:
            if mark == name and before in self.marks:
                timings[key] = round(max(ts - self.marks[before], 0.0), 3)
            before = mark
        return timings

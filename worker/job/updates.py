"""Progress updates for the caller: one small dict shape, from the stages' events and the pipeline.

    {"type": "progress", "run_id", "stage", "message"?, "step", "total_steps", "loss",
     "tokens_per_s", "eta_s", "elapsed_s"}

The RunPod handler posts them with `progress_update` (/status's output while the job runs) and
yields some to the job's stream; `ftw run` prints them to stderr as one line each. `Throttle`
keeps them few: every stage change passes, step updates when `interval_s` seconds have passed or
the step moved by 5% of total_steps since the last one sent (the last one of a stage is sent with
the stage's end).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from worker.events import EVENT_KEYS

ProgressSink = Callable[[dict[str, Any]], None]
MiB = 1 << 20
SHOWN = (
    *EVENT_KEYS[1:],
    "epoch",
    "rows",
    "tokens",
    "message",
    "fill",
    "what",
    "bytes_done",
    "bytes_total",
    "bytes_per_s",
    "step_ms",  # the step's time on the GPU's clock (worker/train/step_queue.py)
    "gpu_sm_mhz",  # the clock and power of the GPU training runs on (worker/train/gpu_clocks.py)
    "gpu_power_w",
    "gpu_busy_pct",  # the share of the last sample's time a kernel ran: under gpu_clocks.BUSY_WARN the host paces
)


def stage_update(run_id: str, stage: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "progress", "run_id": run_id, "stage": stage, **({"message": message} if message else {}), **extra}


def event_update(run_id: str, stage: str, event: dict[str, Any]) -> dict[str, Any]:
    """A child's event reduced to the keys a caller reads (no paths, no free-form payloads)."""
    out = stage_update(run_id, str(event.get("stage") or stage))
    out.update({k: event[k] for k in SHOWN if k in event and isinstance(event[k], (int, float, str)) and k != "stage"})
    if "message" not in out and "step" not in out and isinstance(event.get("event"), str):
        out["message"] = event["event"]  # a milestone without numbers: "loading", "done"
    return out


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_line(update: dict[str, Any]) -> str:
    """`train  step 12/40  loss 2.3100  1.2k tok/s  eta 0:00:35` — one line for a terminal."""
    parts = [f"{update.get('stage', '?'):<10}"]
    if "step" in update:
        parts.append(f"step {update['step']}" + (f"/{update['total_steps']}" if update.get("total_steps") else ""))
    if isinstance(update.get("bytes_done"), (int, float)):
        total = update.get("bytes_total") or 0
        parts.append(f"{update.get('what', '')} {update['bytes_done'] / MiB:.1f}/{total / MiB:.1f} MiB".strip())
    if isinstance(update.get("loss"), (int, float)):
        parts.append(f"loss {update['loss']:.4f}")
    if isinstance(update.get("tokens_per_s"), (int, float)):
        tps = update["tokens_per_s"]
        parts.append(f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
    if isinstance(update.get("eta_s"), (int, float)):
        parts.append(f"eta {_clock(update['eta_s'])}")
    if update.get("message"):
        parts.append(str(update["message"]))
    return "  ".join(parts)


STEP_FRACTION = 0.05


class Throttle:
    """Passes stage changes and messages at once, step updates every interval_s or 5% of the steps."""

    def __init__(self, sink: ProgressSink, interval_s: float = 2.0):
        self.sink, self.interval_s = sink, interval_s
        self.last_sent = 0.0
        self.last_stage: str | None = None
        self.last_step = 0
        self.held: dict[str, Any] | None = None

    def far_enough(self, update: dict[str, Any]) -> bool:
        step, total = update.get("step"), update.get("total_steps")
        if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
            return False
        return step - self.last_step >= max(1.0, total * STEP_FRACTION)

    def __call__(self, update: dict[str, Any]) -> None:
        now = time.monotonic()
        if (
            update.get("stage") != self.last_stage
            or update.get("message")
            or now - self.last_sent >= self.interval_s
            or self.far_enough(update)
        ):
            if (
                self.held is not None
                and self.held.get("stage") == self.last_stage
                and update.get("stage") != self.last_stage
            ):
                self.sink(self.held)
            self.held = None
            self.last_stage, self.last_sent = update.get("stage"), now
            if isinstance(update.get("step"), int):
                self.last_step = update["step"]
            self.sink(update)
        else:
            self.held = update

    def flush(self) -> None:
        if self.held is not None:
            self.sink(self.held)
            self.held = None

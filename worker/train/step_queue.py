"""Keeping the GPU busy: the host must never be what a step waits for.

- Batches come from `batches.StepBatches`: read, collated, pinned and copied to the device (non-blocking) while the
  device runs the steps queued before; their token and target counts, and the varlen attention's segment
  boundaries, are taken on the host.
- `Trainer.train_step` only queues work: nothing in it reads a number back from the device (fp16's loss scaler
  aside, which must look for overflows before the optimizer steps). Its loss and grad norm travel to pinned
  host memory behind a CUDA event (`Readout`), which also times the step on the GPU's own clock: the host
  records a step whenever it gets to it (a step or two late, or several at once), so the time between two
  records is not the time between two steps. After queuing a step the loop records every earlier step whose
  event has completed (a query, no wait), and waits for the oldest only when more than `STEPS_AHEAD` are
  queued beyond it: the host keeps preparing steps while the GPU works, and a pause on the host (a collection,
  a slow event write) is absorbed by the queued work instead of idling the GPU. Chosen over one sync per step
  because it costs nothing in semantics: every point that needs a step's numbers or its state — eval, early
  stopping, a checkpoint, SIGTERM, the end — first records every queued step (`Trainer.record`). Only the loss
  watchdog and the non-finite-loss check may fire a step or two later than the step they name; nothing is
  saved in between, so the run still stops with the same error and the same last checkpoint. With several
  processes the SIGTERM vote (`Trainer.preempted`) is a collective that syncs every step.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

STEPS_AHEAD = 2  # queued steps the host may be ahead of the oldest one whose numbers it has not read


def freeze_heap() -> None:
    """Collect once, then take every object alive now (imports, modules, parameters: millions of them) out of
    the collector's view, before the loop: a full collection inside it then scans what the steps allocate
    instead of pausing the host long enough to drain the GPU's queue. `gc.unfreeze()` gives them back."""
    gc.collect()
    gc.freeze()


def device_mark(device: torch.device) -> torch.cuda.Event | None:
    """A timing event queued on `device`'s stream now (None off CUDA): where the first step's time starts."""
    if device.type != "cuda":
        return None
    mark = torch.cuda.Event(enable_timing=True)
    mark.record()
    return mark


class Readout:
    """A step's numbers on their way to the host: a non-blocking copy to pinned memory behind a
    CUDA event, so queuing the copy waits for nothing and `values()` waits only for that step."""

    def __init__(self, values: torch.Tensor):
        self.ready = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event(enable_timing=True)
            self.ready.record()
        else:
            self.host = values

    def ms_after(self, earlier: torch.cuda.Event | None) -> float | None:
        """Milliseconds on the GPU from `earlier` (the previous step's event, or the loop's start mark) to the end
        of this step, idle time between them included; None off CUDA. Call after `values()`."""
        if self.ready is None or earlier is None:
            return None
        return earlier.elapsed_time(self.ready)

    def done(self) -> bool:
        return self.ready is None or self.ready.query()

    def values(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


@dataclass
class QueuedStep:
    """An optimizer step whose work is queued on the device; `readout` brings back [loss, grad norm, then the
    objective's metric sums, then, with several processes, the global target tokens and tokens]."""

    step: int  # steps done once it completes (1-based, as reported)
    lr: float
    readout: Readout
    counts: tuple[int, int] | None  # (target tokens, tokens) where the host has them: one process

"""`python -m worker.train` with parts of the trainer's step taken out, to find which of them a host-bound step pays
for: bench/gpu_train.py's `ftw~VARIANT[+VARIANT]` arms run this in place of the train stage. For timing only: a
variant's run is not a run a user would want (no clipping, say).

    python bench/train_variants.py VARIANT[+VARIANT] CONFIG_JSON --run-dir RUN_DIR --data CACHE_DIR

Variants (each takes out one thing the bare loop of bench/train_throughput.py does not do while its steps run, or puts
back one the trainer did before):
  sync         every step's batches read, collated and pinned before the first step (the bare loop's way)
  prefetch-thread  the batches read, pinned and copied in a background thread two steps ahead (`ThreadedBatches`:
               the trainer's way until the twenty-third session), handing the GIL back and forth with the loop
  no-autocast  the forward outside torch.autocast (the model's weights are already in the autocast dtype)
  no-clip      no gradient-norm clipping (its norm read as 0)
  no-clocks    no nvidia-smi sampler (worker/train/gpu_clocks.py) and its reader thread
  switch       the interpreter's switch interval 0.1 ms instead of 5 ms: a thread that wants the GIL (the loop, the
               autograd engine's device thread) waits at most that long for another (the clock reader, with
               `prefetch-thread` the prefetcher) to hand it over
  stock-rope   transformers' rotary forward (its angles one fp32 GEMM, which TF32 rounds) instead of the exact
               elementwise angles the trainer installs wherever TF32 is on (kernels/ftw_kernels/rope_angles.py); the
               bare loop runs without TF32, so its GEMM there is exact
  eager-update the clip and optimizer step run eagerly each step, not replayed as one CUDA graph (FTW_GRAPHED_UPDATE=0:
               what the trainer did before worker/train/graphed_update.py; the bare loop steps eagerly too)
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]


class ThreadedBatches:
    """What the trainer read its batches with until the twenty-third session: `StepBatches` drained by a background
    thread that stays two steps ahead, pinning and queuing the copies there, the loop taking each step's from a
    queue. Kept here to measure against (the `prefetch-thread` variant, bench/prefetch_cost.py)."""

    def __init__(self, batches, device):
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._drain, args=(batches, device), daemon=True)
        self.thread.start()

    def _drain(self, batches, device) -> None:
        import torch

        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            for batch in batches.batches:
                while not self.done.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # raised by the loop at that step
            self.queue.put(e)

    def get(self, step):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        assert item.step == step, (item.step, step)
        return item

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)


def prefetch_thread() -> None:
    from worker.train import batches, trainer

    def threaded(*args, **kwargs):
        return ThreadedBatches(batches.StepBatches(*args, **kwargs), args[6])

    trainer.StepBatches = threaded


def preread() -> None:
    from worker.train import batches, trainer

    class Preread(batches.StepBatches):
        """Every step's batches, read before the loop takes the first step."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batches = (batch for batch in list(self.batches))  # the list is read here, before the loop

    trainer.StepBatches = Preread


def no_autocast() -> None:
    from worker.train.model import Precision

    Precision.autocast = lambda self, device_type: contextlib.nullcontext()


def no_clip() -> None:
    import torch

    from worker.train import graphed_update, trainer

    trainer.clip_gradients = lambda params, max_norm: torch.zeros((), device=next(iter(params)).device)
    graphed_update.clip_to_norm = lambda grads, max_norm: torch.zeros((), device=grads[0].device)


def no_clocks() -> None:
    from worker.train.gpu_clocks import GpuClocks

    GpuClocks.start = lambda self: None


def short_switch() -> None:
    sys.setswitchinterval(1e-4)


def stock_rope() -> None:
    from ftw_kernels import registry

    registry._rope_angles = lambda model: []


def eager_update() -> None:
    from worker.train.graphed_update import SWITCH

    os.environ[SWITCH] = "0"  # the operator's switch: the trainer's graph_blocker reads it


VARIANTS = {
    "sync": preread,
    "no-autocast": no_autocast,
    "no-clip": no_clip,
    "no-clocks": no_clocks,
    "eager-update": eager_update,
    "stock-rope": stock_rope,
    "switch": short_switch,
    "prefetch-thread": prefetch_thread,
}


def main() -> None:
    names, argv = sys.argv[1].split("+"), sys.argv[2:]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: {', '.join(VARIANTS)}")
    for name in names:
        VARIANTS[name]()
    from worker.events import run_child
    from worker.train.__main__ import main as train_main

    run_child(lambda: train_main(argv))  # exits with the stage's code


if __name__ == "__main__":
    main()

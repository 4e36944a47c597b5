"""`python -m worker.train` with parts of the trainer's step taken out, to find which of them a host-bound step pays
for: bench/gpu_train.py's `ftw~VARIANT[+VARIANT]` arms run this in place of the train stage. For timing only: a
variant's run is not a run a user would want (no clipping, say).

    python bench/train_variants.py VARIANT[+VARIANT] CONFIG_JSON --run-dir RUN_DIR --data CACHE_DIR

Variants (each takes out one thing the bare loop of bench/train_throughput.py does not do while its steps run):
  sync         every step's batches read, collated and pinned before the first step: no prefetch thread holds the
               GIL while steps launch
  inline       every step's batches read, collated, pinned and copied by the loop when it asks for them, in its own
               thread: the same work as the prefetch thread's, without handing the GIL between two threads
  no-autocast  the forward outside torch.autocast (the model's weights are already in the autocast dtype)
  no-clip      no gradient-norm clipping (its norm read as 0)
  no-clocks    no nvidia-smi sampler (worker/train/gpu_clocks.py) and its reader thread
  switch       the interpreter's switch interval 0.1 ms instead of 5 ms: a thread that wants the GIL (the loop, the
               autograd engine's device thread) waits at most that long for another thread (the prefetcher, the clock
               reader) to hand it over
  eager-update the clip and optimizer step run eagerly each step, not replayed as one CUDA graph (FTW_GRAPHED_UPDATE=0:
               what the trainer did before worker/train/graphed_update.py; the bare loop steps eagerly too)
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]


def preread() -> None:
    from worker.train import batches, trainer

    class Preread(batches.Prefetcher):
        """The prefetcher, run to its end before the loop takes the first step."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "depth": 1 << 20})
            self._thread.join()

    trainer.Prefetcher = Preread


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


def inline() -> None:
    from worker.train import batches, trainer

    class Inline(batches.Prefetcher):
        """Each step's batches read, collated, pinned and copied by the loop itself when it asks for them."""

        def _start(self):
            pass

        def close(self):
            self._source.close()

        def get(self, step):
            batch = next(self._source)
            assert batch.step == step, (batch.step, step)
            return batch

    trainer.Prefetcher = Inline


def short_switch() -> None:
    sys.setswitchinterval(1e-4)


def eager_update() -> None:
    from worker.train.graphed_update import SWITCH

    os.environ[SWITCH] = "0"  # the operator's switch: the trainer's graph_blocker reads it


VARIANTS = {
    "sync": preread,
    "no-autocast": no_autocast,
    "no-clip": no_clip,
    "no-clocks": no_clocks,
    "eager-update": eager_update,
    "switch": short_switch,
    "inline": inline,
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

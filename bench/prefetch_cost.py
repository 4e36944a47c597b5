"""What the trainer's batch prefetcher costs the host on unpacked rows: `read_step`'s CPU time a step, and how much a
loop of small torch ops (a stand-in for a host-bound step's launches) slows while the prefetch thread reads beside it
(they share the interpreter's lock). CPU only; the rows are bench/models.py's lognormal samples, one a row.

    .venv/bin/python bench/prefetch_cost.py                      # 1B's 8 samples a step
    .venv/bin/python bench/prefetch_cost.py --mbs 4 --ops 12000  # 8B's 4 samples, a longer host step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
import torch  # noqa: E402

from bench.models import build_cache  # noqa: E402
from worker.train.batches import BatchPlan, Prefetcher, read_step  # noqa: E402


def host_loop(ops: int, a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        a.add_(b)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ops", type=int, default=6000, help="small torch ops a host step")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from datasets import load_from_disk

    with tempfile.TemporaryDirectory() as tmp:
        build_cache(Path(tmp), a.steps, a.mbs, a.seq, 128256, unpacked=True)
        rows = load_from_disk(str(Path(tmp) / "train"))
        plan = BatchPlan(len(rows), a.mbs, 1, 1, seed=0)
        numpy_rows, order = rows.with_format("numpy"), plan.epoch_order(0)
        read_step(numpy_rows, plan, 0, 0, 0, False, order, varlen=True, target_rows=True, flatten=True)  # warm
        cpu = []
        for step in range(a.steps):
            start = time.thread_time()
            read_step(numpy_rows, plan, step, 0, 0, False, order, varlen=True, target_rows=True, flatten=True)
            cpu.append(time.thread_time() - start)
        x, y = torch.ones(8), torch.ones(8)
        alone = statistics.median(host_loop(a.ops, x, y) for _ in range(a.steps))
        prefetcher = Prefetcher(
            rows, plan, 0, 0, False, range(a.steps), torch.device("cpu"), varlen=True, target_rows=True, flatten=True
        )
        beside = []
        try:
            for step in range(a.steps):
                prefetcher.get(step)
                beside.append(host_loop(a.ops, x, y))
        finally:
            prefetcher.close()
    beside_ms = statistics.median(beside) * 1e3
    print("| samples a step | read_step CPU ms a step | host loop ms alone | beside the prefetcher | × |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {a.mbs} | {statistics.median(cpu) * 1e3:.2f} | {alone * 1e3:.2f} | {beside_ms:.2f} "
        f"| {beside_ms / (alone * 1e3):.2f}× |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

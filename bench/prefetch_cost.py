"""What reading the trainer's batches costs a host-bound loop on unpacked rows: a step's rows read by `Rows` against
datasets' numpy format, `read_step`'s CPU time a step, and how
long a loop of small torch ops (a stand-in for a host-bound step's launches) takes a step when the loop reads each
step's batches itself (`StepBatches`, what the trainer does) against when a background thread reads them beside it
(`ThreadedBatches`, what it did before: the two threads share the interpreter's lock). CPU only; the rows are
bench/models.py's lognormal samples, one a row.

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
from bench.train_variants import ThreadedBatches  # noqa: E402
from worker.train.batches import BatchPlan, Rows, StepBatches, read_step  # noqa: E402


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
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three arms, the median of each taken")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from datasets import load_from_disk

    with tempfile.TemporaryDirectory() as tmp:
        build_cache(Path(tmp), a.steps, a.mbs, a.seq, 128256, unpacked=True)
        rows = load_from_disk(str(Path(tmp) / "train"))
        plan = BatchPlan(len(rows), a.mbs, 1, 1, seed=0)
        sliced, order = Rows(rows), plan.epoch_order(0)
        formatted = rows.with_format("numpy")  # datasets' own way to numpy rows, which read_step took before
        read_step(sliced, plan, 0, 0, 0, False, order, varlen=True, target_rows=True, flatten=True)  # warm
        cpu, by_rows, by_format = [], [], []
        for step in range(a.steps):
            start = time.thread_time()
            read_step(sliced, plan, step, 0, 0, False, order, varlen=True, target_rows=True, flatten=True)
            cpu.append(time.thread_time() - start)
            (indices,) = plan.micro_batches(step, 0, order)
            start = time.thread_time()
            sliced.take(indices)
            by_rows.append(time.thread_time() - start)
            start = time.thread_time()
            columns = formatted[indices]
            [{k: columns[k][i] for k in columns} for i in range(len(indices))]
            by_format.append(time.thread_time() - start)
        x, y = torch.ones(8), torch.ones(8)
        cpu_device = torch.device("cpu")

        def steps(batches) -> float:
            """Median seconds a step of the loop: take the step's batches, then launch its ops."""
            times = []
            try:
                for step in range(a.steps):
                    start = time.perf_counter()
                    batches.get(step)
                    host_loop(a.ops, x, y)
                    times.append(time.perf_counter() - start)
            finally:
                batches.close()
            return statistics.median(times)

        def step_batches():
            kwargs = {"varlen": True, "target_rows": True, "flatten": True}
            return StepBatches(rows, plan, 0, 0, False, range(a.steps), cpu_device, **kwargs)

        ms = {"alone": [], "inline": [], "thread": []}
        for _ in range(a.rounds):  # interleaved: the machine's drift falls on every arm alike
            ms["alone"].append(statistics.median(host_loop(a.ops, x, y) for _ in range(a.steps)) * 1e3)
            ms["inline"].append(steps(step_batches()) * 1e3)
            ms["thread"].append(steps(ThreadedBatches(step_batches(), cpu_device)) * 1e3)
    alone, inline, thread = (statistics.median(ms[k]) for k in ("alone", "inline", "thread"))
    print("| samples a step | rows read by datasets' numpy format, CPU ms | by `Rows` (now) | × |")
    print("|---:|---:|---:|---:|")
    fmt_ms, rows_ms = statistics.median(by_format) * 1e3, statistics.median(by_rows) * 1e3
    print(f"| {a.mbs} | {fmt_ms:.3f} | {rows_ms:.3f} | {fmt_ms / rows_ms:.1f}× |")
    print()
    print(
        "| samples a step | read_step CPU ms a step | host loop ms alone | reads by the loop (now) | × alone "
        "| reads by a thread (before) | × alone | thread × loop |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {a.mbs} | {statistics.median(cpu) * 1e3:.2f} | {alone:.2f} | {inline:.2f} | {inline / alone:.2f}× "
        f"| {thread:.2f} | {thread / alone:.2f}× | {thread / inline:.2f}× |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

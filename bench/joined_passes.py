"""How many forward and backward passes a padding-free step runs with its samples joined across its accumulated
micro-batches (worker/train/batches.py `joined`), against one a micro-batch, over a run of lognormal sample lengths
(bench/models.py `sample_lengths`: mean ~600 tokens, σ 0.8, at most --seq), as the trainer's own plan and functions
lay them out, with the passes every rank runs over --ranks and `ftw estimate`'s count beside them (the rows of
docs/estimate.md: --rows 5000 --steps 200, --ranks 1, 2, 4, 8). CPU only, exact for the passes; the step time beside
them is a model, not a measurement: each pass takes the longer of the host's launches (--host-ms, an H100 host's 8B
step of docs/benchmarks.md's eleventh session) and the GPU's work (--gpu-ms-per-token, the same step's busy time
over its tokens).

    .venv/bin/python bench/joined_passes.py
    .venv/bin/python bench/joined_passes.py --rows 20000 --steps 500 --host-ms 157 --gpu-ms-per-token 0.061
    .venv/bin/python bench/joined_passes.py --rows 5000 --steps 200 --ranks 8   # the passes of 8 ranks in lockstep

The figure to trust is measured on the GPU: `OUT=$OUT bash bench/gpu_step.sh joined`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
import numpy as np  # noqa: E402

from bench.models import sample_lengths  # noqa: E402
from worker.estimate.model import Workload  # noqa: E402
from worker.estimate.shapes import known_shape  # noqa: E402
from worker.train.batches import BatchPlan, joined, largest_micro_tokens, ranks_passes  # noqa: E402


def passes(
    lengths: list[int], mbs: int, accum: int, steps: int, ranks: int = 1
) -> tuple[list[list[int]], list[list[int]], int, float]:
    """(rank 0's micro-batches' tokens each step, its joined passes' tokens each step, the budget, the mean passes a
    step every rank runs: the most any rank's share joins into, `ranks_passes`) over `steps` steps."""
    plan = BatchPlan(len(lengths), mbs, accum, ranks, seed=0)
    sample_tokens = np.asarray(lengths)
    budget = largest_micro_tokens(sample_tokens, plan, steps)
    plain, merged = [], []
    lockstep = sum(ranks_passes(sample_tokens, plan, step, None, budget) for step in range(steps)) / steps
    for step in range(steps):
        micros = plan.micro_batches(step, 0)
        plain.append([int(sample_tokens[m].sum()) for m in micros])
        rows = [{"input_ids": range(lengths[i])} for m in micros for i in m]
        merged.append([sum(len(r["input_ids"]) for r in run) for run in joined(rows, budget)])
    return plain, merged, budget, lockstep


def estimated_passes(mbs: int, accum: int, seq: int, mean_tokens: float, ranks: int) -> float:
    """`ftw estimate`'s passes a step for the same run (worker/estimate/model.Workload.passes)."""
    shape = known_shape("meta-llama/Llama-3.1-8B")  # the passes depend on the batch's tokens, not the model
    w = Workload(shape, "lora", True, mbs, seq, False, accum, micro_tokens=mbs * mean_tokens, joined=True, ranks=ranks)
    return w.passes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--shapes", default="1x4,1x8,2x4,2x8,4x4", help="micro_batch_size x gradient_accumulation_steps")
    ap.add_argument("--ranks", type=int, default=1, help="processes a step is shared over (DDP / FSDP)")
    ap.add_argument("--host-ms", type=float, default=188.6, help="the host's launches of one 8B pass (ms)")
    ap.add_argument("--gpu-ms-per-token", type=float, default=148.5 / 2430, help="the GPU's 8B work a token (ms)")
    a = ap.parse_args()
    lengths = sample_lengths(a.rows, seed=0, cap=a.seq)
    print(f"{a.rows:,} samples, mean {sum(lengths) / len(lengths):.0f} tokens, at most {a.seq}; {a.steps} steps")
    print(
        "| mbs × accum | budget (largest micro-batch) | passes a step, plain → joined | every rank's, of "
        f"{a.ranks} | the estimate's (× that) | tokens a pass, plain → joined | modelled step ms, plain → joined | × |"
    )
    print("|---|---:|---|---:|---:|---|---|---:|")
    mean = sum(lengths) / len(lengths)
    for shape in a.shapes.split(","):
        mbs, accum = (int(x) for x in shape.split("x"))
        plain, merged, budget, lockstep = passes(lengths, mbs, accum, a.steps, a.ranks)

        def step_ms(steps: list[list[int]]) -> float:
            return sum(max(a.host_ms, t * a.gpu_ms_per_token) for s in steps for t in s) / len(steps)

        n_plain, n_joined = (sum(map(len, s)) / len(s) for s in (plain, merged))
        per_pass = [sum(map(sum, s)) / sum(map(len, s)) for s in (plain, merged)]
        before, after = step_ms(plain), step_ms(merged)
        estimated = estimated_passes(mbs, accum, a.seq, mean, a.ranks)
        print(
            f"| {mbs} × {accum} | {budget:,} | {n_plain:.2f} → {n_joined:.2f} | {lockstep:.2f} "
            f"| {estimated:.2f} ({estimated / lockstep:.2f}×) "
            f"| {per_pass[0]:,.0f} → {per_pass[1]:,.0f} | {before:,.0f} → {after:,.0f} | {before / after:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

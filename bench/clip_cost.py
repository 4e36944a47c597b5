"""What gradient clipping costs the host a step: torch's clip_grad_norm_ against the trainer's clip_gradients
(worker/train/optim.py), on as many gradients as a LoRA over every linear layer has (7 a layer, A and B each: 224 at
1B, 448 at 8B). CPU only; the gradients are tiny, so the table shows the Python and dispatch work per tensor that a
host-bound GPU step pays, not the arithmetic.

    .venv/bin/python bench/clip_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
import torch  # noqa: E402

from worker.train.optim import clip_gradients  # noqa: E402


def timed_us(clip, params: list[torch.nn.Parameter], calls: int) -> float:
    """Median µs a call over `calls` calls, in rounds of 10."""
    rounds = []
    for _ in range(calls // 10):
        start = time.perf_counter()
        for _ in range(10):
            clip(params, 1.0)
        rounds.append((time.perf_counter() - start) / 10 * 1e6)
    return statistics.median(rounds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| gradients (model) | torch clip_grad_norm_ µs | clip_gradients µs | torch / ours |")
    print("|---|---:|---:|---:|")
    for tensors, model in ((224, "1B LoRA"), (448, "8B LoRA")):
        params = [torch.nn.Parameter(torch.zeros(16, 8)) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn(16, 8)
        arms = {"torch": torch.nn.utils.clip_grad_norm_, "ours": clip_gradients}
        for clip in arms.values():  # warm
            timed_us(clip, params, 20)
        us = {name: [] for name in arms}
        for _ in range(3):  # interleaved rounds: a slow spell of the machine falls on both
            for name, clip in arms.items():
                us[name].append(timed_us(clip, params, a.calls))
        t, o = statistics.median(us["torch"]), statistics.median(us["ours"])
        print(f"| {tensors} ({model}) | {t:,.0f} | {o:,.0f} | {t / o:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

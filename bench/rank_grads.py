"""A LoRA projection's dy·(s·B) and B's grad, per projection of one decoder layer: cuBLAS as ftw's backward calls
it (two GEMMs, each reading dy: kernels/ftw_kernels/lora.py) against kernels/ftw_kernels/rank_grads.py (one read
of dy), at several tilings of the latter.

    python3 bench/rank_grads.py --shapes llama-8b,llama-1b      # on a GPU (< 1 min)
    python3 bench/rank_grads.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5); each row checks the kernel's
results against cuBLAS's first."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402
from ftw_kernels import rank_grads as kernel  # noqa: E402

RANK, SCALE = 16, 2.0
TILINGS = [  # (tokens per program, columns per load, programs wanted, pipeline stages)
    (128, 64, 264, 4),
    (128, 128, 264, 3),
    (64, 64, 264, 4),
    (256, 64, 264, 3),
    (128, 64, 528, 4),
    (256, 64, 132, 3),
]


def cublas(dy, b, xa, dyb):
    """ftw's backward before the kernel: dyb's rows by one GEMM, B's grad in fp32 by another, then scaled."""
    torch.mm(b.t(), dy.t(), out=dyb)
    grad = torch.mm(dy.t(), xa, out_dtype=torch.float32) if dy.is_cuda else dy.t() @ xa
    return grad.mul_(SCALE)


def fused(tiling):
    def run(dy, b, xa, dyb):
        kernel.TOKENS_PER_PROGRAM, kernel.COLUMNS_PER_LOAD, kernel.MIN_PROGRAMS, kernel.STAGES = tiling
        return kernel.rank_grads(dy, b, xa, SCALE, dyb)

    return run


def main() -> None:
    args, device, dtype = setup(__doc__)
    tilings = TILINGS if device.type == "cuda" else [(16, 16, 1, 1)]
    print(f"rank {RANK}; µs per projection, dyb and B's grad together; x = cuBLAS / kernel (> 1: kernel faster)")
    print(
        "| shape | projection | out | cuBLAS | "
        + " | ".join(f"{t[0]}×{t[1]}, {t[2]}p, {t[3]}s" for t in tilings)
        + " |"
    )
    print("|---|---|---:|---:|" + "---:|" * len(tilings))
    for shape in args.shapes:
        tokens, hidden, inter, kv = SHAPES[shape]
        totals = [0.0] * (len(tilings) + 1)
        for name, out in (
            ("q", hidden),
            ("k", kv),
            ("v", kv),
            ("o", hidden),
            ("gate", inter),
            ("up", inter),
            ("down", hidden),
        ):
            dy = torch.randn(tokens, out, device=device, dtype=dtype)
            b = torch.randn(out, RANK, device=device, dtype=dtype) / out**0.5
            xa = torch.randn(tokens, 3 * RANK, device=device, dtype=dtype)[:, RANK : 2 * RANK]  # a stacked xa's slice
            dyb = torch.empty(3 * RANK, tokens, device=device, dtype=dtype)[RANK : 2 * RANK]
            ref_dyb = torch.empty_like(dyb)
            ref = cublas(dy, b, xa, ref_dyb)
            times = [timed_us(lambda: cublas(dy, b, xa, dyb), device)]  # noqa: B023
            for tiling in tilings:
                run = fused(tiling)
                grad = run(dy, b, xa, dyb)
                for got, want in ((grad, ref), (dyb.float(), ref_dyb.float())):
                    err = (got - want).abs().max().item() / want.abs().max().item()
                    assert err < 2e-2, f"{shape} {name} {tiling}: relative error {err:.2e}"
                times.append(timed_us(lambda: run(dy, b, xa, dyb), device))  # noqa: B023
            totals = [t + u for t, u in zip(totals, times)]
            cells = " | ".join(f"{u:.1f} ({times[0] / u:.2f}×)" for u in times[1:])
            print(f"| {shape} | {name} | {out} | {times[0]:.1f} | {cells} |")
        cells = " | ".join(f"{u:.1f} ({totals[0] / u:.2f}×)" for u in totals[1:])
        print(f"| {shape} | a layer | | {totals[0]:.1f} | {cells} |")


if __name__ == "__main__":
    main()

"""The pieces of an fp8 base matmul against the bf16 matmul it replaces, at the Llama-3.1-8B projections' shapes
(one GPU of compute capability ≥ 8.9; `bench/gpu_fp8.sh` runs it):

    python bench/fp8_ops.py [--tokens 8192]

Per projection (q, k/v, o, gate/up, down), forward x·Wᵀ and backward dy·W: the bf16 GEMM; the float8 GEMM alone
(`torch._scaled_mm`, row-wise scales); the row quantisation of the input (kernels/ftw_kernels/fp8_quant.py); the
weight's transpose (backward only); and the whole fp8 path as the fused LoRA functions call it. Times are CUDA
events over 20 repeats after 3; the last column is bf16 time / whole fp8 path time (above 1: fp8 is faster).
"""

from __future__ import annotations

import argparse

SHAPES = {"q": (4096, 4096), "k/v": (1024, 4096), "o": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def timed(fn, repeats: int = 20) -> float:
    """Milliseconds per call."""
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def measure(name: str, n: int, k: int, tokens: int) -> list[str]:
    """The table's two rows (forward, backward dx) of one projection."""
    import torch

    from ftw_kernels.fp8 import _ones, input_grad, linear, quantise_weight
    from ftw_kernels.fp8_quant import quantise_rows, transposed

    w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
    w = quantise_weight(w16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    xq, sx = quantise_rows(x)
    dyq, sdy = quantise_rows(dy, w.scale)
    wt, ones, bf16 = transposed(w.data), _ones(x.device, k), torch.bfloat16
    fwd = dict(
        bf16=timed(lambda: x @ w16.t()),
        gemm=timed(lambda: torch._scaled_mm(xq, w.t(), sx, w.scale, out_dtype=bf16, use_fast_accum=True)),
        quant=timed(lambda: quantise_rows(x)),
        transpose=0.0,
        path=timed(lambda: linear(x, w)),
    )
    bwd = dict(
        bf16=timed(lambda: dy @ w16),
        gemm=timed(lambda: torch._scaled_mm(dyq, wt.t(), sdy, ones, out_dtype=bf16)),
        quant=timed(lambda: quantise_rows(dy, w.scale)),
        transpose=timed(lambda: transposed(w.data)),
        path=timed(lambda: input_grad(dy, w)),
    )
    return [
        f"| {name} ({n} × {k}) | {label} | {t['bf16']:.3f} | {t['gemm']:.3f} | {t['quant']:.3f} | "
        f"{t['transpose']:.3f} | {t['path']:.3f} | {t['bf16'] / t['path']:.2f}× |"
        for label, t in (("forward", fwd), ("backward dx", bwd))
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="rows of x (4 × 2048 at the 8B shape's micro-batch)")
    a = ap.parse_args()
    import torch

    torch.manual_seed(0)
    rows = [
        "| projection (out × in) | pass | bf16 GEMM ms | fp8 GEMM ms | quantise ms | transpose ms | fp8 path ms "
        "| bf16 / fp8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (n, k) in SHAPES.items():
        rows += measure(name, n, k, a.tokens)
    print(f"tokens {a.tokens}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""The rank-r GEMM that writes a LoRA term, (x·Aᵀ)·Bᵀ: tokens × r times r × out, a tokens × out output from a
contraction of 16. It only has to write its output, yet cuBLAS writes these at 1.7–3.2 TB/s on an H200, under
the ~4.2 TB/s ftw's flat SwiGLU kernels reach. This times cuBLAS against a Triton kernel that computes each
output tile as one rank-sized dot and stores it, per projection of a decoder layer, by tile configuration.
Found (docs/benchmarks.md): 1.16–1.27× cuBLAS, ~0.05 ms of an 8B layer: not worth a kernel of ftw's own.

    python3 bench/rank_expand.py --shapes llama-8b,llama-1b      # on a GPU (< 60 s)
    python3 bench/rank_expand.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

GB/s: the output's bytes over the time (the inputs are L2-sized). Times: bench/gpu_bench.py's `timed_us`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402

RANK = 16
CONFIGS = [(64, 256, 4), (64, 256, 8), (128, 128, 4), (128, 128, 8), (128, 256, 8), (32, 256, 4)]  # rows, cols, warps


@triton.jit
def _expand(XA, B, C, n_rows, n_cols, xa_stride, b_stride, R: tl.constexpr, NATIVE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, R)
    xa = tl.load(XA + rows[:, None].to(tl.int64) * xa_stride + r[None, :], mask=rows[:, None] < n_rows, other=0.0)
    b = tl.load(B + cols[:, None].to(tl.int64) * b_stride + r[None, :], mask=cols[:, None] < n_cols, other=0.0)
    if NATIVE:
        acc = tl.dot(xa, b.T)
    else:  # Triton's CPU interpreter multiplies bf16 tensors as their raw bits
        acc = tl.dot(xa.to(tl.float32), b.T.to(tl.float32), input_precision="ieee")
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(C + rows[:, None].to(tl.int64) * n_cols + cols[None, :], acc.to(C.dtype.element_ty), mask=mask)


def expand(xa: torch.Tensor, b: torch.Tensor, config) -> torch.Tensor:
    """xa·bᵀ (tokens × out) in xa's dtype; xa may be a column slice."""
    block_m, block_n, warps = config
    out = torch.empty(xa.shape[0], b.shape[0], device=xa.device, dtype=xa.dtype)
    grid = (triton.cdiv(xa.shape[0], block_m), triton.cdiv(b.shape[0], block_n))
    _expand[grid](xa, b, out, xa.shape[0], b.shape[0], xa.stride(0), b.stride(0), R=xa.shape[1],
                  NATIVE=xa.is_cuda, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)  # fmt: skip
    return out


def main() -> None:
    args, device, dtype = setup(__doc__)
    print("| shape | projection | cuBLAS µs (GB/s) | Triton µs (GB/s) | × cuBLAS | config |")
    print("|---|---|---:|---:|---:|---|")
    for shape in args.shapes:
        tokens, hidden, inter, kv = SHAPES[shape]
        stacked = torch.randn(tokens, 3 * RANK, device=device, dtype=dtype)  # x·[A₁;A₂;A₃]ᵀ: slices, as ftw's
        for name, out in (("q, o, down", hidden), ("k, v", kv), ("gate, up", inter)):
            xa, b = stacked[:, RANK : 2 * RANK], torch.randn(out, RANK, device=device, dtype=dtype)
            expected = xa.float() @ b.float().t()
            size = tokens * out * stacked.element_size()
            cublas = timed_us(lambda: xa @ b.t(), device)  # noqa: B023
            best, best_config = float("inf"), None
            for config in CONFIGS if device.type == "cuda" else CONFIGS[:1]:
                error = ((expand(xa, b, config).float() - expected).norm() / expected.norm()).item()
                if error > 1e-2:
                    print(f"{config}: relative error {error:.3g}, skipped")
                    continue
                us = timed_us(lambda: expand(xa, b, config), device)  # noqa: B023
                best, best_config = (us, config) if us < best else (best, best_config)
            cells = f"{cublas:.1f} ({size / cublas / 1e3:.0f}) | {best:.1f} ({size / best / 1e3:.0f})"
            print(f"| {shape} | {name} | {cells} | {cublas / best:.2f}× | {best_config} |", flush=True)


if __name__ == "__main__":
    main()

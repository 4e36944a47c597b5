"""Down's rank-r term of dh added inside the SwiGLU backward instead of by the dx GEMM: would it pay?

The fused MLP's backward (kernels/ftw_kernels/lora.py `LoRAGatedMLP`) forms dh = dy·W_down + (dy·s·B)·A_down as
cuBLAS's rank-r product, written (tokens × intermediate: 235 MB a step at 8B), then the dx GEMM adding itself to
it (beta 1: the same bytes read again), then the SwiGLU backward reading dh. With LoRA's dropout on down's input
the term goes through the mask (kernels/ftw_kernels/lora_dropout.py `rank_terms_dropped`), a second draw of the
mask the SwiGLU backward draws again when it recomputes h dropped. The alternative timed here: the GEMM writes
dy·W_down alone and one 2-D kernel below takes dh = that + the term (a rank-sized dot per tile from the
L2-resident dyb and A_down, masked from the draw it shares with h's dropout) before the SwiGLU backward's
arithmetic. Both arms return the same dg, du and h (checked before timing, to bf16's rounding: the fused arm
adds the term to the GEMM's rounded output in fp32).

    python3 bench/down_term.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/down_term.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

Times: bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5); rank 16, p 0.05."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402
from ftw_kernels.lora_dropout import (  # noqa: E402
    Dropout,
    block_words,
    blocking,
    keep_scaled,
    lane_columns,
    lane_kept,
    program_rows,
    rank_terms_dropped,
)
from ftw_kernels.swiglu import swiglu_backward  # noqa: E402

RANK, P, ROWS = 16, 0.05, 16


@triton.jit(do_not_specialize=["seed"])
def _swiglu_bwd_term(DH, G, U, DG, DU, DYB, A, n_rows, cols, stride_dyb, seed, threshold, scale, R: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, DROP: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
    """dh = DH + (DYBᵀ·A through the mask), then dg and du over G and U and h (dropped) over DH."""
    rows = program_rows(ROWS)
    k = tl.arange(0, R)
    lhs = tl.load(DYB + k[None, :] * stride_dyb + rows[:, None], mask=rows[:, None] < n_rows, other=0.0)
    if not NATIVE:
        lhs = lhs.to(tl.float32)
    if DROP:
        words = block_words(seed, rows, BLOCK)
    for lane in tl.static_range(8):
        cols_idx = lane_columns(lane, BLOCK)
        inside = (rows[:, None] < n_rows) & (cols_idx[None, :] < cols)
        rhs = tl.load(A + k[:, None] * cols + cols_idx[None, :], mask=cols_idx[None, :] < cols, other=0.0)
        if NATIVE:
            terms = tl.dot(lhs, rhs)
        else:
            terms = tl.dot(lhs, rhs.to(tl.float32), input_precision="ieee")
        terms = terms.to(DH.dtype.element_ty)  # rounded as cuBLAS's product is
        if DROP:
            keep = lane_kept(words, lane, threshold)
            terms = keep_scaled(terms, keep, scale)
        offs = rows[:, None] * cols + cols_idx[None, :]
        dh = tl.load(DH + offs, mask=inside, other=0.0).to(tl.float32) + terms.to(tl.float32)
        g = tl.load(G + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=inside, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=inside)
        tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=inside)
        h = (silu * u).to(DH.dtype.element_ty)
        if DROP:
            h = keep_scaled(h, keep, scale).to(DH.dtype.element_ty)
        tl.store(DH + offs, h, mask=inside)


def fused(dy, w, dyb, a, g, u, drop: Dropout | None):
    """The alternative: dh = dy·W alone, then one kernel (dh's term, dg, du, h over dh)."""
    dh = dy @ w
    rows, cols = dh.shape
    grid = (triton.cdiv(rows, ROWS), blocking(rows, cols)[0][1])
    block = blocking(rows, cols)[2]
    args = drop.kernel_args if drop is not None else (0, 0, 1.0)
    native = dh.is_cuda
    _swiglu_bwd_term[grid](dh, g, u, g, u, dyb, a, rows, cols, dyb.stride(0), *args, R=RANK, ROWS=ROWS, BLOCK=block,
                           DROP=drop is not None, NATIVE=native, num_warps=8)  # fmt: skip
    return g, u, dh


def today(dy, w, dyb, a, g, u, drop: Dropout | None):
    """ftw's backward as it is: the term written, the GEMM adding itself (beta 1), the SwiGLU backward."""
    dh = dyb.t() @ a if drop is None else rank_terms_dropped(dyb, a, drop)
    dh.addmm_(dy, w)
    h = swiglu_backward(dh, g, u, g, u, want_h=True, dropout=drop)
    return g, u, h


def main() -> None:
    args, device, dtype = setup(__doc__)
    print("| shape | dropout | today µs | term inside µs | × | max |Δ| / max |h| |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in args.shapes:
        tokens, hidden, inter, _kv = SHAPES[shape]
        dy = torch.randn(tokens, hidden, device=device, dtype=dtype)
        w = torch.randn(hidden, inter, device=device, dtype=dtype) / hidden**0.5
        dyb = torch.randn(RANK, tokens, device=device, dtype=dtype) / 4
        a = torch.randn(RANK, inter, device=device, dtype=dtype) / 4
        g0, u0 = (torch.randn(tokens, inter, device=device, dtype=dtype) for _ in range(2))
        for drop in (None, Dropout(P, 1234)):
            outs = [arm(dy, w, dyb, a, g0.clone(), u0.clone(), drop) for arm in (today, fused)]
            err = max((x.float() - y.float()).abs().max().item() for x, y in zip(*outs))
            scale = max(t.float().abs().max().item() for t in outs[0])
            g, u = g0.clone(), u0.clone()  # timed in place, as the MLP's backward runs
            today_us = timed_us(partial(today, dy, w, dyb, a, g, u, drop), device)
            fused_us = timed_us(partial(fused, dy, w, dyb, a, g, u, drop), device)
            name = "none" if drop is None else f"p {P}"
            cells = f"{today_us:.1f} | {fused_us:.1f} | {today_us / fused_us:.2f}× | {err / scale:.1e}"
            print(f"| {shape} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

"""Triton kernels of the FP8 base weights (kernels/ftw_kernels/fp8.py): activations quantised per row on the fly,
and the fp8 weight transposed for the backward's GEMM.

`quantise_rows(x, col_scale)` writes float8_e4m3fn q and fp32 scales s (M×1) with x·diag(col_scale) ≈ s·q, in
one read of x per pass (amax, then scale and cast; the second pass mostly hits L2): plain torch would run
abs, amax, a division, a clamp and a cast over fp32 temporaries, several times the bytes of the matmul's
input on every projection. `col_scale` (optional, length N) folds the weight's per-output-channel scales
into dy before dy is quantised for dx = dy·W (fp8.py says why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv, next_power_of_2
from ftw_kernels.precision import INTERPRETED

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale and zeros, never a division by zero
# a row up to this many columns (an 8B model's 14336-wide MLP) stays in registers: read once (16 warps: 32 a thread);
# under the interpreter small blocks, whose cost is per element, exercise the two-pass path too
MAX_BLOCK = 64 if INTERPRETED else 16384


@triton.jit
def _load(x_row, COL, start, N_COLS: tl.constexpr, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    x = tl.load(x_row + cols, mask=cols < N_COLS, other=0.0).to(tl.float32)
    if HAS_COL:
        x = x * tl.load(COL + cols, mask=cols < N_COLS, other=0.0)
    return x


@triton.jit
def _store(
    q_row, x, inv, start, N_COLS: tl.constexpr, BLOCK: tl.constexpr, FMAX: tl.constexpr, ROUND_FIRST: tl.constexpr
):
    cols = start + tl.arange(0, BLOCK)
    q = tl.minimum(tl.maximum(x * inv, -FMAX), FMAX)
    if ROUND_FIRST:  # e4m3: 3 mantissa bits, subnormal spacing 2⁻⁹
        step = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(q), 0.015625))) - 3.0)
        q = tl.floor(q / step + 0.5) * step
    tl.store(q_row + cols, q.to(q_row.dtype.element_ty), mask=cols < N_COLS)


@triton.jit
def _quantise_rows(
    X,
    COL,
    Q,
    S,
    stride_x,
    stride_q,
    N_COLS: tl.constexpr,
    HAS_COL: tl.constexpr,
    BLOCK: tl.constexpr,
    FMAX: tl.constexpr,
    ROUND_FIRST: tl.constexpr,
):
    """One row a program: a row that fits one block is read once, a longer one twice (amax, then the cast)."""
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = X + row * stride_x, Q + row * stride_q
    if N_COLS <= BLOCK:
        x = _load(x_row, COL, 0, N_COLS, HAS_COL, BLOCK)
        top = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        tl.store(S + row, top / FMAX)
        _store(q_row, x, FMAX / top, 0, N_COLS, BLOCK, FMAX, ROUND_FIRST)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N_COLS, BLOCK):
            amax = tl.maximum(amax, tl.abs(_load(x_row, COL, start, N_COLS, HAS_COL, BLOCK)))
        top = tl.maximum(tl.max(amax, axis=0), 1e-12)
        tl.store(S + row, top / FMAX)
        for start in range(0, N_COLS, BLOCK):
            _store(
                q_row,
                _load(x_row, COL, start, N_COLS, HAS_COL, BLOCK),
                FMAX / top,
                start,
                N_COLS,
                BLOCK,
                FMAX,
                ROUND_FIRST,
            )


def quantise_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): x (M×N, rows contiguous) times diag(col_scale) as float8_e4m3fn q and fp32 s (M×1), one scale a row."""
    m, n = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(m, n, dtype=FP8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        col = col_scale.reshape(-1) if col_scale is not None else s  # a dummy pointer when there is none
        block = min(MAX_BLOCK, next_power_of_2(n))
        _quantise_rows[(m,)](
            x,
            col,
            q,
            s,
            x.stride(0),
            q.stride(0),
            N_COLS=n,
            HAS_COL=col_scale is not None,
            BLOCK=block,
            FMAX=FP8_MAX,
            # the interpreter's float8 cast mis-rounds values that round up into the next power of two (124.7 →
            # 64): under it the kernel rounds to e4m3's grid itself and the cast only copies (CUDA's cvt rounds right)
            ROUND_FIRST=INTERPRETED,
            num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4,
        )
    return q, s


def quantise_rows_reference(
    x: torch.Tensor, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `quantise_rows` computes, in torch (the tests' reference)."""
    x = x.float() * (col_scale.reshape(1, -1) if col_scale is not None else 1.0)
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(MIN_AMAX)
    return (x * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8), amax / FP8_MAX


@triton.jit
def _transpose(SRC, DST, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tile = tl.load(SRC + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask)
    tl.store(DST + cols.to(tl.int64)[None, :] * n_rows + rows[:, None], tile, mask=mask)


def transposed(w: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of wᵀ (w: R×C contiguous, one-byte elements), moved as bytes."""
    r, c = w.shape
    out = torch.empty(c, r, dtype=w.dtype, device=w.device)
    if w.numel():
        grid = (cdiv(r, 64), cdiv(c, 64))
        _transpose[grid](w.view(torch.uint8), out.view(torch.uint8), r, c, BR=64, BC=64)
    return out

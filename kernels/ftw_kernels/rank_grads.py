"""LoRA's two rank-sized products of a projection's output gradient dy, from one read of it: dyb = dy·(s·B)
(tokens × r: dx's rank-r terms and A's grad take it) and B's grad s·dyᵀ·(x·Aᵀ) (out × r).

cuBLAS runs them as two GEMMs, and each is a pass over dy at memory speed, since the other side is r wide: at 8B
(4 × 2048 tokens) gate's and up's dy are 235 MB each, and the two passes over them took 84.7 and 80.4 µs a
projection of a profiled H100 step. Here one kernel reads each tile of dy once and feeds both dots. Its grid is
(token blocks, column splits), one wave of resident programs: a program sums its rows of dyb over its columns and
writes B's grad of its columns over its rows; the fp32 partial sums (splits × r × tokens and token blocks × out × r,
an eighth of dy's bytes at r 16) are added by two reductions after, in a fixed order: the result does not depend on
scheduling. Measured on an H100 (bench/rank_grads.py, docs/benchmarks.md 2026-12-06 tenth session): a decoder
layer's seven pairs 1.27× the GEMMs' time at 8B and 1.28× at 1B (gate and up 1.36×, k and v 1.04×), 3.6 ms of a
481 ms step at 8B in isolation; in the step, under the power cap, about half of that (tree_ab 1.004× for the
first version, 2.8 ms in isolation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv, next_power_of_2, rank_block, sm_count
from ftw_kernels.lora_dropout import native_dots
from ftw_kernels.precision import INTERPRETED

ROWS = 256  # token rows a program: B's grad's partial sums are r · 4 / (ROWS · 2) of dy's bytes
COLS = 64  # dy's columns a step of a program's loop
WARPS = 8  # 179 registers a thread at 256 × 64 (ptxas, sm_90a): one program an SM
MAX_R = 32  # ranks past this take cuBLAS's two GEMMs: the partial sums would grow to half of dy's bytes and more
# narrower outputs too: at 8B's k and v (1,024 wide) the first version took 21.6 µs against the GEMMs' 19.9 (H100,
# bench/rank_grads.py, docs/benchmarks.md 2026-12-06 tenth session). The one-wave grid since took 19.5 against 20.4
# there (1.04×, alone): the bound can go once a step measures k and v through the kernel
MIN_COLS = 2048
PROGRAMS_PER_SM = 1  # resident at ROWS × COLS × WARPS (179 registers a thread): the grid is one wave of them


@triton.jit
def _rank_grads(DY, B, XA, PART_DYB, PART_DB, n_rows, n_cols, stride_dy, stride_b, stride_xa, R, scale,
                RP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, STEPS: tl.constexpr,
                NATIVE: tl.constexpr):  # fmt: skip
    block, split = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = block * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, RP)
    in_rows, in_rank = rows < n_rows, k < R
    xa = tl.load(XA + rows[:, None] * stride_xa + k[None, :], mask=in_rows[:, None] & in_rank[None, :], other=0.0)
    if not NATIVE:  # the interpreter multiplies 16-bit operands as raw bits: fp32, exact (no tf32)
        xa = xa.to(tl.float32)
    dyb = tl.zeros((ROWS, RP), dtype=tl.float32)
    for step in tl.range(0, STEPS, num_stages=3):  # the split's STEPS · COLS columns
        cols = (split * STEPS + step) * COLS + tl.arange(0, COLS)
        in_cols = cols < n_cols
        dy = tl.load(
            DY + rows[:, None] * stride_dy + cols[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0
        )
        b = tl.load(B + cols[:, None] * stride_b + k[None, :], mask=in_cols[:, None] & in_rank[None, :], other=0.0)
        if NATIVE:
            dyb = tl.dot(dy, b, dyb)
            db = tl.dot(tl.trans(dy), xa)
        else:
            dy = dy.to(tl.float32)
            dyb = tl.dot(dy, b.to(tl.float32), dyb, input_precision="ieee")
            db = tl.dot(tl.trans(dy), xa, input_precision="ieee")
        part_db = PART_DB + block * n_cols * R + cols[:, None] * R + k[None, :]
        tl.store(part_db, db * scale, mask=in_cols[:, None] & in_rank[None, :])
    part_dyb = PART_DYB + split * R * n_rows + k[None, :] * n_rows + rows[:, None]
    tl.store(part_dyb, dyb, mask=in_rows[:, None] & in_rank[None, :])


def fusable(dy: torch.Tensor, b: torch.Tensor, xa: torch.Tensor) -> bool:
    """Whether `rank_grads` takes these: 2-D with unit column strides, one dtype, a rank ≤ MAX_R, at least MIN_COLS
    outputs, on a GPU in a 16-bit dtype, or under the interpreter in fp32 too (its partial sums are fp32: float64
    stays with torch)."""
    shapes_agree = dy.dim() == b.dim() == xa.dim() == 2 and b.shape[0] == dy.shape[1] and xa.shape[0] == dy.shape[0]
    return (
        shapes_agree
        and b.shape[1] == xa.shape[1] <= MAX_R
        and dy.shape[1] >= MIN_COLS
        and dy.dtype == b.dtype == xa.dtype
        and all(t.stride(1) == 1 for t in (dy, b, xa))
        and (native_dots(dy) or INTERPRETED and dy.dtype in (torch.float32, torch.bfloat16, torch.float16))
    )


def rank_grads(
    dy: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, scale: float, dyb: torch.Tensor, grad_dtype: torch.dtype
) -> torch.Tensor:
    """Writes (dy·b)ᵀ into `dyb` (r × tokens, any row stride) and returns scale·dyᵀ·xa (out × r) in
    `grad_dtype`: dy is tokens × out, b (s·B) out × r, xa (x·Aᵀ) tokens × r (`fusable` says which)."""
    n_rows, n_cols = dy.shape
    rank = b.shape[1]
    if not n_rows or not n_cols:
        dyb.zero_()
        return dy.new_zeros(n_cols, rank, dtype=grad_dtype)
    blocks = cdiv(n_rows, ROWS)
    steps, splits = column_splits(blocks, cdiv(n_cols, COLS), PROGRAMS_PER_SM * sm_count(dy.device))
    part_dyb = torch.empty(splits, rank, n_rows, dtype=torch.float32, device=dy.device)
    part_db = torch.empty(blocks, n_cols, rank, dtype=torch.float32, device=dy.device)
    _rank_grads[(blocks, splits)](
        dy, b, xa, part_dyb, part_db, n_rows, n_cols, dy.stride(0), b.stride(0), xa.stride(0), rank, scale,
        RP=rank_block(rank), ROWS=ROWS, COLS=COLS, STEPS=steps, NATIVE=native_dots(dy), num_warps=WARPS,
    )  # fmt: skip
    dyb.copy_(part_dyb[0] if splits == 1 else part_dyb.sum(0))
    return part_db.sum(0).to(grad_dtype)


def column_splits(blocks: int, col_steps: int, slots: int) -> tuple[int, int]:
    """(steps a split, splits) of a row of `col_steps` column steps, for `blocks` token blocks on `slots` resident
    programs: as many splits as fill the slots in one wave, each a multiple of 8 steps (a power of two under 8), so
    that few variants are compiled whatever the token counts."""
    steps = cdiv(col_steps, min(col_steps, max(1, slots // blocks)))
    steps = cdiv(steps, 8) * 8 if steps > 8 else next_power_of_2(steps)
    return steps, cdiv(col_steps, steps)

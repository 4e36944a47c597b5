"""LoRA's dropout inside the fused projections (kernels/ftw_kernels/lora.py): the rank-r terms read
x·keep/(1 − p), the base GEMMs read x.

PEFT drops each LoRA projection's input with a mask of its own and keeps the dropped copy for A's grad, beside
the mask. Here one mask serves all the projections of one input (q, k, v; gate, up): their stacked A's stay one
GEMM, and the dropped copy replaces the input the backward keeps (a frozen base needs neither), so dropout costs
no activation memory. The mask itself is never stored: a counter-based generator (Philox, `tl.randint4x`) draws it
again from a seed and each element's (row, column), for dx's rank-r terms and for the down projection's input,
which the backward recomputes. Each element is decided by 16 of a draw's bits, so one Philox call serves eight
elements: drawing the mask, not moving the bytes, was most of what dropout cost (Philox's ten rounds are ~100
integer instructions a call). Each projection's update has PEFT's distribution, p rounded to a multiple of 2⁻¹⁶;
only the projections of one input share their mask.

The seed comes from torch's CPU generator, so `torch.manual_seed` repeats a run, a resumed run whose RNG state
was restored repeats its masks, and a checkpointed layer's recompute (torch.utils.checkpoint restores the CPU RNG
state) draws the masks of its first forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv, next_power_of_2, rank_block

BLOCK = 1024  # columns a program at most
# warps of the elementwise kernels that draw a mask: two adjacent columns a thread in each 128-column lane, so
# 4-byte loads of 16-bit data. Four warps gave each thread one column, 2-byte loads: the dropout pass read 77.8 µs at
# 8B's hidden width on an H100, where the four-lane kernel before it had read ~62 (docs/benchmarks.md, 2026-12-06)
PASS_WARPS = 2
KEEP_BITS = 16  # bits of a Philox draw that decide one element: two elements a draw, eight a call


@dataclass(frozen=True)
class Dropout:
    """One input's dropout: probability `p`, mask drawn from `seed`."""

    p: float
    seed: int

    @property
    def threshold(self) -> int:
        """An element is dropped where its 16-bit draw falls below this: p rounded to a multiple of 2⁻¹⁶ (PEFT's
        0.05 drops 0.0500031 of them), at least one value and never all."""
        return min(max(round(self.p * 2**KEEP_BITS), 1), 2**KEEP_BITS - 1)

    @property
    def scale(self) -> float:
        """1/(1 − p) of the p the threshold draws, so that a kept element's expected value is its own."""
        return 2**KEEP_BITS / (2**KEEP_BITS - self.threshold)

    @property
    def kernel_args(self) -> tuple[int, int, float]:
        """(seed, threshold, scale), as the kernels that draw the mask take them."""
        return self.seed, self.threshold, self.scale


def draw(p: float) -> Dropout | None:
    """A fresh mask for one input (None when p is 0: eval mode, or no dropout configured)."""
    if not p:
        return None
    return Dropout(p, int(torch.randint(0, 2**31 - 1, ()).item()))


@triton.jit
def block_words(seed, rows, BLOCK: tl.constexpr):
    """Philox's four 32-bit words for each of `rows` × BLOCK // 8 counters of this program's column block (in a
    grid of (row groups, column blocks) as `blocking` lays it out). A counter names (row, column block, column
    within the block mod BLOCK // 8), so an element of a tensor of a given width draws the same number whatever
    its strides and whichever kernel draws it (the dropout pass here, the SwiGLU kernels that write down's
    dropped input, dx's rank-r terms)."""
    EIGHTH: tl.constexpr = BLOCK // 8
    column_block = rows[:, None] * tl.num_programs(1) + tl.program_id(1)
    return tl.randint4x(seed, column_block * EIGHTH + tl.arange(0, EIGHTH)[None, :])


@triton.jit
def lane_kept(words, LANE: tl.constexpr, threshold):
    """Whether each element of lane LANE (the block's columns LANE · BLOCK // 8 onwards, BLOCK // 8 of them)
    survives: 16 bits of one of the counter's words decide it, so one Philox call serves eight elements, each in
    the same thread as its draw (no shuffle between them)."""
    word = words[LANE % 4]
    if LANE < 4:
        draws = word & 0xFFFF
    else:
        draws = word >> 16
    return draws >= threshold


@triton.jit
def keep_scaled(x, keep, scale):
    """x (any dtype) times 1/(1 − p) in fp32 where `keep`; 0 where dropped."""
    return tl.where(keep, x.to(tl.float32) * scale, 0.0)


@triton.jit
def program_rows(ROWS: tl.constexpr):
    """This program's rows in `blocking`'s grid."""
    return tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)


@triton.jit
def lane_columns(LANE: tl.constexpr, BLOCK: tl.constexpr):
    """The columns of lane LANE of this program's column block."""
    EIGHTH: tl.constexpr = BLOCK // 8
    return tl.program_id(1) * BLOCK + LANE * EIGHTH + tl.arange(0, EIGHTH)


def blocking(rows: int, cols: int) -> tuple[tuple[int, int], int, int]:
    """(grid, rows a program, columns a program) of the kernels that draw a mask for a rows × cols tensor. A
    width's column blocks fix its counters: the same width always draws the same mask. Narrow rows (tiny models)
    share a program, so that no program is mostly masked lanes."""
    block = min(BLOCK, max(64, next_power_of_2(cols)))
    per_program = BLOCK // block
    return (cdiv(rows, per_program), cdiv(cols, block)), per_program, block


@triton.jit(do_not_specialize=["seed"])  # a fresh seed a step: no variant compiled for one
def _dropout_rows(X, Y, n_rows, cols, stride_x, stride_y, seed, threshold, scale, ROWS: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    rows = program_rows(ROWS)
    words = block_words(seed, rows, BLOCK)
    for lane in tl.static_range(8):
        cols_idx = lane_columns(lane, BLOCK)
        inside = (rows[:, None] < n_rows) & (cols_idx[None, :] < cols)
        x = tl.load(X + rows[:, None] * stride_x + cols_idx[None, :], mask=inside, other=0.0)
        y = keep_scaled(x, lane_kept(words, lane, threshold), scale).to(Y.dtype.element_ty)
        tl.store(Y + rows[:, None] * stride_y + cols_idx[None, :], y, mask=inside)


def dropped(x: torch.Tensor, dropout: Dropout, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows × columns, unit column stride) with each element kept with probability 1 − p and scaled by
    1/(1 − p), the mask drawn from (seed, row, column); into `out` (which may be x: in place), else a new
    contiguous tensor."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"dropped: a 2-D tensor with unit column stride, not shape {tuple(x.shape)}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != x.shape or y.stride(1) != 1:
        raise ValueError("dropped: `out` must have x's shape and unit column stride")
    rows, cols = x.shape
    if rows and cols:
        grid, per_program, block = blocking(rows, cols)
        strides = (x.stride(0), y.stride(0))
        _dropout_rows[grid](
            x, y, rows, cols, *strides, *dropout.kernel_args, ROWS=per_program, BLOCK=block, num_warps=PASS_WARPS
        )
    return y


def native_dots(t: torch.Tensor) -> bool:
    """NATIVE of the rank-sized dots below: t's 16-bit operands as they are on a GPU; else fp32."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


@triton.jit
def rank_lhs(DYB, rows, n_rows, stride_dyb, R, RP: tl.constexpr, NATIVE: tl.constexpr):
    """dybᵀ's rows `rows` (rows × RP, zeros past R): the left operand of each lane's rank-sized dot. Not NATIVE
    (the interpreter, which multiplies 16-bit operands as raw bits): fp32, multiplied exactly (no tf32)."""
    k = tl.arange(0, RP)
    lhs = tl.load(DYB + k[None, :] * stride_dyb + rows[:, None], mask=(rows[:, None] < n_rows) & (k[None, :] < R))
    if not NATIVE:
        lhs = lhs.to(tl.float32)
    return lhs


@triton.jit
def lane_term(lhs, A, cols_idx, cols, stride_a, R, RP: tl.constexpr, NATIVE: tl.constexpr):
    """lhs · A[:, cols_idx] in fp32: a lane's columns of a rank-r term, A's rows read from L2."""
    k = tl.arange(0, RP)
    rhs = tl.load(A + k[:, None] * stride_a + cols_idx[None, :], mask=(k[:, None] < R) & (cols_idx[None, :] < cols))
    if NATIVE:
        term = tl.dot(lhs, rhs)
    else:
        term = tl.dot(lhs, rhs.to(tl.float32), input_precision="ieee")
    return term


@triton.jit(do_not_specialize=["seed"])  # a fresh seed a step: no variant compiled for one
def _rank_terms_dropped(DYB, A, Y, n_rows, cols, stride_dyb, stride_a, R, seed, threshold, scale, RP: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
    rows = program_rows(ROWS)
    lhs = rank_lhs(DYB, rows, n_rows, stride_dyb, R, RP, NATIVE)
    words = block_words(seed, rows, BLOCK)
    for lane in tl.static_range(8):  # a lane's dot at a time: its tile in registers
        cols_idx = lane_columns(lane, BLOCK)
        terms = lane_term(lhs, A, cols_idx, cols, stride_a, R, RP, NATIVE).to(Y.dtype.element_ty)  # as cuBLAS rounds
        y = keep_scaled(terms, lane_kept(words, lane, threshold), scale)
        inside = (rows[:, None] < n_rows) & (cols_idx[None, :] < cols)
        tl.store(Y + rows[:, None] * cols + cols_idx[None, :], y.to(Y.dtype.element_ty), mask=inside)


RANK_ROWS = 16  # token rows a program of _rank_terms_dropped
# Σr at most: each program reads Σr × BLOCK of the A's for its RANK_ROWS × BLOCK of output, so the kernel's time
# grows with Σr. Measured on an H100 at 8B's widths (docs/benchmarks.md, 2026-12-06): 49.9 µs at Σr 16 (o), 62.2 at
# 32 (gate, up), 74.0 at 48 (q, k, v), where cuBLAS's product and the dropout pass took 85.5, 83.8 and 82.8 with the
# two-warp pass (ninth session): Σr 48 pays too, by that bench; raised once a step measures it.
RANK_TERMS_MAX_R = 32


def rank_terms_dropped(
    dyb: torch.Tensor, a_rows: torch.Tensor, dropout: Dropout, max_r: int = RANK_TERMS_MAX_R
) -> torch.Tensor:
    """dybᵀ·a_rows (dyb: Σr × tokens, a_rows: Σr × width) through `dropout`'s mask, the mask `dropped` draws for
    a tokens × width tensor: dx's rank-r terms under LoRA's dropout. Written by one kernel (each tile a rank-sized
    dot, masked as it is stored) where the width spans whole mask blocks of `dropped`'s (≥ BLOCK columns) and Σr is
    at most `max_r` (bench/lora_dropout.py raises it to time the kernel past it); else the product and then the
    dropout pass, over it."""
    sum_r, tokens = dyb.shape
    width = a_rows.shape[1]
    if width < BLOCK or dyb.stride(1) != 1 or a_rows.stride(1) != 1 or sum_r > max_r:
        terms = dyb.t() @ a_rows
        return dropped(terms, dropout, out=terms)
    y = torch.empty(tokens, width, dtype=dyb.dtype, device=dyb.device)
    if tokens:
        grid = (cdiv(tokens, RANK_ROWS), cdiv(width, BLOCK))
        _rank_terms_dropped[grid](
            dyb, a_rows, y, tokens, width, dyb.stride(0), a_rows.stride(0), sum_r, *dropout.kernel_args,
            RP=rank_block(sum_r), ROWS=RANK_ROWS, BLOCK=BLOCK, NATIVE=native_dots(dyb), num_warps=8,
        )  # fmt: skip
    return y

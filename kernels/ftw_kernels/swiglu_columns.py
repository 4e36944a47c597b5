"""The fused MLP's SwiGLU backward by column blocks, with the grads that sum over tokens inside it: down's A grad
dybᵀ·h, and gate's and up's B grads sᵢ·dgᵀ·xaᵢ and sᵢ·duᵀ·xaᵢ.

The row-wise backward (kernels/ftw_kernels/swiglu.py `swiglu_backward_term`) writes h over dh for down's A grad,
a GEMM that reads it back, and leaves dg and du to be read again for gate's and up's B grads (with their dyb,
kernels/ftw_kernels/rank_grads.py): at 8B (4 × 2048 tokens) h, dg and du are 235 MB each. Here a program owns a
block of columns and walks the tokens: each tile's h, dg and du meet the rank-sized operands (dyb's and x·Aᵀ's rows
for the tile's tokens, from L2) in three dots whose sums over tokens stay in the program's registers. h is never
written; dg and du are written over g and u as before, and gate's and up's dyb (sums over columns) stay cuBLAS's.
Down's rank-r term of dh is added per tile, as the row-wise kernel adds it. Tokens are cut into a few splits when
the column blocks alone would not fill the GPU; their fp32 partial sums (splits × width × r) are added after.
Without LoRA's dropout on down's input (its mask is drawn in the row-wise kernels' lanes) and where the backward
has x·A_downᵀ saved (no checkpointing): the fused MLP (kernels/ftw_kernels/lora.py) takes the row-wise kernel else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels import rank_grads, swiglu
from ftw_kernels.lora_dropout import native_dots, rank_block

COLS = 64  # columns a program: 128-byte rows of each bf16 tile
ROWS = 64  # tokens a step of a program's walk
WARPS = 4


@triton.jit
def _rank_rows(PTR, rows, n_rows, stride, R, RP: tl.constexpr, NATIVE: tl.constexpr):
    """PTR's rows `rows` of a tokens × R operand with row stride `stride` (rows × RP, zeros past R)."""
    k = tl.arange(0, RP)
    tile = tl.load(
        PTR + rows[:, None] * stride + k[None, :], mask=(rows[:, None] < n_rows) & (k[None, :] < R), other=0.0
    )
    return tile if NATIVE else tile.to(tl.float32)


@triton.jit
def _dot(a, b, NATIVE: tl.constexpr):
    """a·b in fp32: 16-bit operands on tensor cores; under the interpreter fp32, exactly (no tf32)."""
    if NATIVE:
        return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _swiglu_bwd_columns(DH, G, U, DYB, A, XA, PART_DA, PART_DBG, PART_DBU, n_rows, cols, stride_dyb, stride_a,
                        stride_xa, R, R_G, R_U, scale_g, scale_u, RP: tl.constexpr, RPG: tl.constexpr,
                        RPU: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, STEPS: tl.constexpr,
                        NATIVE: tl.constexpr):  # fmt: skip
    block, split = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    cols_idx = block * COLS + tl.arange(0, COLS)
    in_cols = cols_idx < cols
    k = tl.arange(0, RP)
    a = tl.load(A + k[:, None] * stride_a + cols_idx[None, :], mask=(k[:, None] < R) & in_cols[None, :], other=0.0)
    grad_a = tl.zeros((RP, COLS), dtype=tl.float32)
    grad_bg = tl.zeros((COLS, RPG), dtype=tl.float32)
    grad_bu = tl.zeros((COLS, RPU), dtype=tl.float32)
    for step in tl.range(0, STEPS, num_stages=2):
        rows = (split * STEPS + step) * ROWS + tl.arange(0, ROWS)
        inside = (rows[:, None] < n_rows) & in_cols[None, :]
        offs = rows[:, None] * cols + cols_idx[None, :]
        # dybᵀ's rows: down's term of dh, and the left side of its A grad
        dyb = tl.load(DYB + k[None, :] * stride_dyb + rows[:, None], mask=(rows[:, None] < n_rows) & (k[None, :] < R),
                      other=0.0)  # fmt: skip
        term = _dot(dyb, a, NATIVE).to(DH.dtype.element_ty)  # rounded as cuBLAS writes it
        dh = tl.load(DH + offs, mask=inside, other=0.0).to(tl.float32) + term.to(tl.float32)
        g = tl.load(G + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=inside, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = (dh * u * sig * (1.0 + g * (1.0 - sig))).to(G.dtype.element_ty)
        du = (dh * silu).to(U.dtype.element_ty)
        tl.store(G + offs, dg, mask=inside)
        tl.store(U + offs, du, mask=inside)
        h = (silu * u).to(G.dtype.element_ty)  # rounded as the row-wise kernel writes it
        grad_a += _dot(tl.trans(dyb), h, NATIVE)
        grad_bg += _dot(tl.trans(dg), _rank_rows(XA, rows, n_rows, stride_xa, R_G, RPG, NATIVE), NATIVE)
        grad_bu += _dot(tl.trans(du), _rank_rows(XA + R_G, rows, n_rows, stride_xa, R_U, RPU, NATIVE), NATIVE)
    _store_rank_major(PART_DA + split * R * cols, grad_a, k, cols_idx, cols, R)
    _store_cols_major(PART_DBG + split * cols * R_G, grad_bg * scale_g, cols_idx, cols, R_G, RPG)
    _store_cols_major(PART_DBU + split * cols * R_U, grad_bu * scale_u, cols_idx, cols, R_U, RPU)


@triton.jit
def _store_rank_major(PTR, tile, k, cols_idx, cols, R):
    tl.store(PTR + k[:, None] * cols + cols_idx[None, :], tile, mask=(k[:, None] < R) & (cols_idx[None, :] < cols))


@triton.jit
def _store_cols_major(PTR, tile, cols_idx, cols, R, RP: tl.constexpr):
    k = tl.arange(0, RP)
    tl.store(PTR + cols_idx[:, None] * R + k[None, :], tile, mask=(cols_idx[:, None] < cols) & (k[None, :] < R))


def columns_fit(g: torch.Tensor, a_down: torch.Tensor, xa: torch.Tensor, ranks: tuple[int, int]) -> bool:
    """Whether `swiglu_backward_columns` takes this backward: contiguous g (and u, dh alike), down's A and x·Aᵀ
    of g's dtype, down's rank up to swiglu.TERM_MAX_R and gate's and up's up to rank_grads.MAX_R, on a GPU in a
    16-bit dtype or under the interpreter."""
    return (
        g.dtype == a_down.dtype == xa.dtype
        and g.is_contiguous()
        and a_down.stride(1) == 1
        and xa.stride(1) == 1
        and xa.shape[1] == sum(ranks)
        and a_down.shape[0] <= swiglu.TERM_MAX_R  # read at each call: a bench or test may change it
        and max(ranks) <= rank_grads.MAX_R
        and (native_dots(g) or rank_grads.INTERPRETED and g.dtype in (torch.float32, torch.bfloat16, torch.float16))
    )


def swiglu_backward_columns(
    dh: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    dyb: torch.Tensor,
    a_down: torch.Tensor,
    xa: torch.Tensor,
    ranks: tuple[int, int],
    scales: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dg and du written over g and u for dh + dybᵀ·a_down (down's rank-r term); returns (down's A grad dyb·h,
    gate's B grad s_g·dgᵀ·xa_g, up's s_u·duᵀ·xa_u) in fp32, h = silu(g)·u never written. dh, g, u: tokens ×
    width, contiguous; dyb: r × tokens; a_down: r × width; xa: tokens × (r_g + r_u), x·[A_g; A_u]ᵀ."""
    n_rows, cols = g.shape
    rank, (rank_g, rank_u) = a_down.shape[0], ranks
    dh = dh.contiguous()  # a no-op for the dx GEMM's output; the kernel reads dh, g and u at one offset
    col_blocks = triton.cdiv(cols, COLS)
    row_steps = max(1, triton.cdiv(n_rows, ROWS))
    wanted = rank_grads.PROGRAMS_PER_SM * rank_grads.sm_count(g.device)
    # a power of two of steps a split: few variants compiled, whatever the token counts
    steps = triton.next_power_of_2(triton.cdiv(row_steps, min(row_steps, triton.cdiv(wanted, col_blocks))))
    splits = triton.cdiv(row_steps, steps)
    # every program writes all of its columns' partial sums: no fill first
    part_da = g.new_empty(splits, rank, cols, dtype=torch.float32)
    part_bg = g.new_empty(splits, cols, rank_g, dtype=torch.float32)
    part_bu = g.new_empty(splits, cols, rank_u, dtype=torch.float32)
    if cols:
        _swiglu_bwd_columns[(col_blocks, splits)](
            dh, g, u, dyb, a_down, xa, part_da, part_bg, part_bu, n_rows, cols, dyb.stride(0), a_down.stride(0),
            xa.stride(0), rank, rank_g, rank_u, *scales, RP=rank_block(rank), RPG=rank_block(rank_g),
            RPU=rank_block(rank_u), ROWS=ROWS, COLS=COLS, STEPS=steps, NATIVE=native_dots(g), num_warps=WARPS,
        )  # fmt: skip
    return tuple(p[0] if splits == 1 else p.sum(0) for p in (part_da, part_bg, part_bu))  # type: ignore[return-value]

"""SwiGLU h = silu(g) * u, elementwise, with a backward that needs only g and u.

`swiglu_backward` is shared with the fused LoRA MLP, which has it write dg and du over g and u, and h,
recomputed for the down projection's LoRA grads, over dh (no new activation-sized buffers). With LoRA's
dropout on the down projection, kernels laid out as the dropout pass's also write h as its rank-r term reads it,
dropped, in the same pass (kernels/ftw_kernels/lora_dropout.py: the same mask, at any width): no second pass
reads h again. `swiglu_backward_term` also adds down's rank-r term to dh in its pass, so the dx GEMM writes
dy·W_down alone and no tokens × intermediate term is written and read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv, rank_block
from ftw_kernels.lora_dropout import (
    PASS_WARPS,
    Dropout,
    block_words,
    blocking,
    keep_scaled,
    lane_columns,
    lane_kept,
    lane_term,
    native_dots,
    program_rows,
    rank_lhs,
)

BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, H, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_at(DH, G, U, H, DG, DU, offs, mask, keep, scale, WRITE_H: tl.constexpr, DROP: tl.constexpr, term=None):
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    if term is not None:  # down's rank-r term of dh, added here rather than by the dx GEMM (`swiglu_backward_term`)
        dh += term
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
    if WRITE_H:  # last: H may be DH's memory
        h = (silu * u).to(H.dtype.element_ty)
        if DROP:  # rounded first, as the dropout pass reads it
            h = keep_scaled(h, keep, scale).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)


@triton.jit
def _swiglu_bwd(DH, G, U, H, DG, DU, n, BLOCK: tl.constexpr, WRITE_H: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _swiglu_bwd_at(DH, G, U, H, DG, DU, offs, offs < n, False, 1.0, WRITE_H, False)


# With LoRA's dropout on down's input: programs laid out as the dropout pass's (lora_dropout.blocking), its eight
# lanes drawn as the pass draws them, so h's mask is the one `dropped` would draw over it.
@triton.jit(do_not_specialize=["seed"])  # a fresh seed a step: no variant compiled for one
def _swiglu_fwd_dropped(G, U, H, HD, n_rows, cols, seed, threshold, scale, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = program_rows(ROWS)
    words = block_words(seed, rows, BLOCK)
    for lane in tl.static_range(8):
        offs, mask = _lane_offsets(rows, lane, n_rows, cols, BLOCK)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        h = (g * tl.sigmoid(g) * u).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        tl.store(HD + offs, keep_scaled(h, lane_kept(words, lane, threshold), scale).to(HD.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed a step: no variant compiled for one
def _swiglu_bwd_dropped(DH, G, U, H, DG, DU, n_rows, cols, seed, threshold, scale, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    rows = program_rows(ROWS)
    words = block_words(seed, rows, BLOCK)
    for lane in tl.static_range(8):
        offs, mask = _lane_offsets(rows, lane, n_rows, cols, BLOCK)
        _swiglu_bwd_at(DH, G, U, H, DG, DU, offs, mask, lane_kept(words, lane, threshold), scale, True, True)


@triton.jit
def _lane_offsets(rows, LANE: tl.constexpr, n_rows, cols, BLOCK: tl.constexpr):
    cols_idx = lane_columns(LANE, BLOCK)
    return rows[:, None] * cols + cols_idx[None, :], (rows[:, None] < n_rows) & (cols_idx[None, :] < cols)


# Down's rank-r term of dh inside the backward: dh = dy·W_down (the dx GEMM without its beta) + dybᵀ·A_down, the
# term a rank-sized dot a tile from operands L2 holds, through the mask h's dropout draws here anyway. It saves the
# term's tokens × intermediate write and the GEMM's read of it (and, with dropout, a second draw of the mask):
# bench/down_term.py, H100, 8B's shape: 1.04× the backward's three steps without dropout, 1.12× with (1B: 1.07×,
# 1.19×; docs/benchmarks.md, 2026-12-06). Tiles of TERM_ROWS rows (a tensor-core dot's least) by a lane's columns.
TERM_ROWS = 16
# 8 warps: 8 elements a thread of a 16 × 128 lane (16-byte loads). ptxas (sm_90a) gives the kernel 164 registers a
# thread without dropout and 216 with it, so one block of 8 warps a multiprocessor; at 16 warps, 91 and 97 (16 rows)
# or 127 (32 rows, 16-byte loads again). bench/down_term.py --tiles times them.
TERM_WARPS = 8
TERM_MAX_R = 16  # the rank measured; a larger one keeps the GEMM's beta until bench/down_term.py --rank times it


@triton.jit(do_not_specialize=["seed"])  # a fresh seed a step: no variant compiled for one
def _swiglu_bwd_term(DH, G, U, DYB, A, n_rows, cols, stride_dyb, stride_a, R, seed, threshold, scale,
                     RP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, DROP: tl.constexpr,
                     NATIVE: tl.constexpr):  # fmt: skip
    rows = program_rows(ROWS)
    lhs = rank_lhs(DYB, rows, n_rows, stride_dyb, R, RP, NATIVE)
    if DROP:
        words = block_words(seed, rows, BLOCK)
    for lane in tl.static_range(8):
        keep = False
        if DROP:
            keep = lane_kept(words, lane, threshold)
        term_lane(DH, G, U, A, lhs, rows, lane_columns(lane, BLOCK), n_rows, cols, stride_a, R, keep, scale, RP, DROP,
                  NATIVE)  # fmt: skip


@triton.jit
def term_lane(DH, G, U, A, lhs, rows, cols_idx, n_rows, cols, stride_a, R, keep, scale, RP: tl.constexpr,
              DROP: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
    """One lane of `_swiglu_bwd_term`: down's term of dh (through `keep` with DROP), dg and du over g and u, h over
    dh."""
    term = lane_term(lhs, A, cols_idx, cols, stride_a, R, RP, NATIVE).to(DH.dtype.element_ty)  # as cuBLAS rounds
    if DROP:
        term = keep_scaled(term, keep, scale)
    offs = rows[:, None] * cols + cols_idx[None, :]
    inside = (rows[:, None] < n_rows) & (cols_idx[None, :] < cols)
    _swiglu_bwd_at(DH, G, U, DH, G, U, offs, inside, keep, scale, True, DROP, term.to(tl.float32))


def _rows_of(g: torch.Tensor) -> tuple[int, int]:
    cols = g.shape[-1]
    return g.numel() // max(cols, 1), cols


def swiglu_forward_raw(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(g)
    n = g.numel()
    _swiglu_fwd[(cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK)
    return h


def swiglu_forward_dropped(g: torch.Tensor, u: torch.Tensor, dropout: Dropout | None):
    """(h, h after `dropout`, None without it), both written by one pass; g and u contiguous, as every kernel here
    takes them (the fused MLP's GEMMs write them so)."""
    if dropout is None:
        return swiglu_forward_raw(g, u), None
    h, hd = torch.empty_like(g), torch.empty_like(g)
    rows, cols = _rows_of(g)
    if g.numel():
        grid, per_program, block = blocking(rows, cols)
        _swiglu_fwd_dropped[grid](
            g, u, h, hd, rows, cols, *dropout.kernel_args, ROWS=per_program, BLOCK=block, num_warps=PASS_WARPS
        )
    return h, hd


def swiglu_backward(dh, g, u, dg, du, want_h: bool, dropout: Dropout | None = None) -> torch.Tensor | None:
    """Write dL/dg and dL/du into dg and du (they may be g and u themselves: in place);
    return h = silu(g)*u, recomputed, when asked: written over dh (each element's dh is read before its h
    is stored; dh is spent by then), which saves a tokens × intermediate buffer at the MLP backward's peak.
    With `dropout`, the h returned is h after it (what the down projection's rank-r term read), in the same pass."""
    if want_h:
        h = dh if dh.dtype == g.dtype and dh.is_contiguous() else torch.empty_like(g)
    else:
        h = g
    n = g.numel()
    tensors = (dh, g, u, h, dg, du)
    if want_h and dropout is not None:
        rows, cols = _rows_of(g)
        if n:
            grid, per_program, block = blocking(rows, cols)
            _swiglu_bwd_dropped[grid](
                *tensors, rows, cols, *dropout.kernel_args, ROWS=per_program, BLOCK=block, num_warps=PASS_WARPS
            )
        return h
    _swiglu_bwd[(cdiv(n, BLOCK),)](*tensors, n, BLOCK=BLOCK, WRITE_H=want_h)
    return h if want_h else None


def term_fits(g: torch.Tensor, a_rows: torch.Tensor) -> bool:
    """Whether `swiglu_backward_term` takes the backward of g (with a dh of g's dtype): contiguous operands of one
    dtype, a rank up to TERM_MAX_R and lanes of at least 16 columns (a dot's least)."""
    return (
        g.dtype == a_rows.dtype
        and g.is_contiguous()
        and a_rows.is_contiguous()
        and a_rows.shape[0] <= TERM_MAX_R
        and blocking(*_rows_of(g))[2] >= 128
    )


def swiglu_backward_term(dh, g, u, dyb, a_rows, dropout: Dropout | None) -> torch.Tensor:
    """`swiglu_backward(dh + dybᵀ·a_rows, g, u, g, u, want_h=True, dropout)` in one pass (`term_fits` says
    where): the term (down's rank-r term of its input grad, through `dropout`'s mask) added to dh tile by tile,
    dg and du written over g and u, h (dropped) over dh and returned. dyb: Σr × tokens, a_rows: Σr × width."""
    rows, cols = _rows_of(g)
    if rows and cols:
        block = blocking(rows, cols)[2]
        seed, threshold, scale = dropout.kernel_args if dropout is not None else (0, 0, 1.0)
        sum_r = a_rows.shape[0]
        _swiglu_bwd_term[(cdiv(rows, TERM_ROWS), cdiv(cols, block))](
            dh, g, u, dyb, a_rows, rows, cols, dyb.stride(0), a_rows.stride(0), sum_r, seed, threshold, scale,
            RP=rank_block(sum_r), ROWS=TERM_ROWS, BLOCK=block, DROP=dropout is not None, NATIVE=native_dots(g),
            num_warps=TERM_WARPS,
        )  # fmt: skip
    return dh


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return swiglu_forward_raw(g, u)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        swiglu_backward(dh.contiguous(), g, u, dg, du, want_h=False)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(g, u)


def swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for LlamaMLP-shaped modules (silu gate): projections as they are (LoRA or
    not), the activation fused."""
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

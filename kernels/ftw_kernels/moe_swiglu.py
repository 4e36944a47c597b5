"""SwiGLU over the experts' [gate | up] rows (rows × 2N, the layout of `gate_up_proj`'s output):
h = silu(gate)·up forward, and the backward that writes dgate, dup over the pre-activations in
place and recomputes h for the down projection's LoRA gradient. One pass each, fp32 math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv
from ftw_kernels.moe_gemm import INTERPRETED


@triton.jit
def _swiglu_rows(
    DH,
    GU,
    H,
    n_rows,
    N,
    sdm,
    sgm,
    shm,
    GRADS: tl.constexpr,
    WRITE_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """GRADS: dgate, dup written over [gate | up] (from DH); WRITE_H: h = silu(gate)·up written to H."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < n_rows)[:, None] & (cols < N)[None, :]
    gp = GU + rows[:, None] * sgm + cols[None, :]
    g = tl.load(gp, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gp + N, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    if WRITE_H:
        tl.store(H + rows[:, None] * shm + cols[None, :], (silu * u).to(H.dtype.element_ty), mask=ok)
    if GRADS:
        dh = tl.load(DH + rows[:, None] * sdm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(gp, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(GU.dtype.element_ty), mask=ok)
        tl.store(gp + N, (dh * silu).to(GU.dtype.element_ty), mask=ok)


def _launch(dh: torch.Tensor | None, gu: torch.Tensor, h: torch.Tensor | None) -> None:
    rows, n = gu.shape[0], gu.shape[1] // 2
    block_m, block_n = (16, 16) if INTERPRETED else (32, 128)
    grid = (cdiv(rows, block_m), cdiv(n, block_n))
    dh_, h_ = dh if dh is not None else gu, h if h is not None else gu
    _swiglu_rows[grid](
        dh_,
        gu,
        h_,
        rows,
        n,
        dh_.stride(0),
        gu.stride(0),
        h_.stride(0),
        GRADS=dh is not None,
        WRITE_H=h is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )


def swiglu_rows(gu: torch.Tensor) -> torch.Tensor:
    """h = silu(gate)·up of [gate | up] rows."""
    h = gu.new_empty(gu.shape[0], gu.shape[1] // 2)
    _launch(None, gu, h)
    return h


def swiglu_rows_backward(dh: torch.Tensor, gu: torch.Tensor, want_h: bool) -> torch.Tensor | None:
    """In place: gu ([gate | up], rows × 2N) becomes [dgate | dup]; returns h when asked."""
    h = torch.empty_like(dh) if want_h else None
    _launch(dh, gu, h)
    return h

"""Rotary position embedding on (batch, seq, heads, head_dim) tensors, one row of heads per program.

Packing-aware through its inputs: cos/sin are the model's own rotary table gathered at each
token's position id, and the data pipeline restarts position ids at 0 at every packed sample.
Taking cos/sin (rather than recomputing them from inv_freq) keeps every rope scaling type
(llama3, yarn, linear) the model's rotary module implements. The backward is the same rotation
by -θ, so nothing but cos/sin is saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv, next_power_of_2


@triton.jit
def _rope(
    X,
    COS,
    SIN,
    Y,
    n_rows,
    seq_len,
    n_heads,
    stride_cb,
    stride_cs,
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Programs take BLOCK_R (batch·seq) rows × all heads; the tile is (rows·heads, head_dim/2)."""
    idx = tl.arange(0, BLOCK_R * BLOCK_H)
    row = tl.program_id(0) * BLOCK_R + idx // BLOCK_H
    h = idx % BLOCK_H
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    rmask = (row < n_rows) & (h < n_heads)
    cbase = ((row // seq_len) * stride_cb + (row % seq_len) * stride_cs)[:, None] + d[None, :]
    cmask = (row < n_rows)[:, None] & dmask[None, :]
    c1 = tl.load(COS + cbase, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cbase + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cbase, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cbase + HALF, mask=cmask, other=0.0).to(tl.float32)
    mask = rmask[:, None] & dmask[None, :]
    base = (row.to(tl.int64) * n_heads + h)[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF, mask=mask, other=0.0).to(tl.float32)
    # forward: [x1, x2]·cos + [-x2, x1]·sin; backward (the transpose): [dy1·c1 + dy2·s2, dy2·c2 - dy1·s1]
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + base, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + base + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    bsz, seq, heads, dim = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    half = dim // 2
    n_rows = bsz * seq
    block_h, block_d = next_power_of_2(heads), next_power_of_2(half)
    # ~4k elements a program on the GPU; the interpreter pays per program, so it takes big tiles
    budget = 4096 if x.is_cuda else 65536
    block_r = max(1, min(next_power_of_2(n_rows), budget // (block_h * block_d)))
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope[(cdiv(n_rows, block_r),)](
        x,
        cos,
        sin,
        y,
        n_rows,
        seq,
        heads,
        stride_cb,
        cos.stride(1),
        HALF=half,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        BACKWARD=backward,
    )
    return y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # the rotation's transpose: rotate by -θ, with the halves' roles swapped (see the kernel)
        return _launch(dy, cos, sin, backward=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos, sin: (batch or 1, seq, head_dim)."""
    return RoPEFunction.apply(x, cos, sin)

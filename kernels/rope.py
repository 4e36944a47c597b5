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


@triton.jit
def _rope(X, COS, SIN, Y, seq_len, n_heads, stride_cb, stride_cs,
          HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    row = tl.program_id(0)
    b = row // seq_len
    s = row % seq_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cbase = b * stride_cb + s * stride_cs
    c1 = tl.load(COS + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cbase + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cbase + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1 = -s1
        s2 = -s2
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < n_heads) & dmask[None, :]
    base = row.to(tl.int64) * n_heads * 2 * HALF + h[:, None] * 2 * HALF + d[None, :]
    x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF, mask=mask, other=0.0).to(tl.float32)
    # forward: [x1, x2]·cos + [-x2, x1]·sin; backward (transpose): [dy1·c1 + dy2·s2, dy2·c2 - dy1·s1]
    if BACKWARD:
        y1 = x1 * c1 - x2 * s2
        y2 = x2 * c2 + x1 * s1
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
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope[(bsz * seq,)](x, cos, sin, y, seq, heads, stride_cb, cos.stride(1), HALF=half,
                        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(half), BACKWARD=backward)
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

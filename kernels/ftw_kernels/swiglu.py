"""SwiGLU h = silu(g) * u, elementwise, with a backward that needs only g and u.

`swiglu_backward` is shared with the fused LoRA MLP, which has it write dg and du over g and u, and h,
recomputed for the down projection's LoRA grads, over dh (no new activation-sized buffers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _swiglu_bwd(DH, G, U, H, DG, DU, n, BLOCK: tl.constexpr, WRITE_H: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
    if WRITE_H:  # last: H may be DH's memory
        tl.store(H + offs, (silu * u).to(H.dtype.element_ty), mask=mask)


def swiglu_forward_raw(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(g)
    n = g.numel()
    _swiglu_fwd[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK)
    return h


def swiglu_backward(dh, g, u, dg, du, want_h: bool) -> torch.Tensor | None:
    """Write dL/dg and dL/du into dg and du (they may be g and u themselves: in place);
    return h = silu(g)*u, recomputed, when asked: written over dh (each element's dh is read before its h
    is stored; dh is spent by then), which saves a tokens × intermediate buffer at the MLP backward's peak."""
    if want_h:
        h = dh if dh.dtype == g.dtype and dh.is_contiguous() else torch.empty_like(g)
    else:
        h = g
    n = g.numel()
    _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dh, g, u, h, dg, du, n, BLOCK=BLOCK, WRITE_H=want_h)
    return h if want_h else None


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

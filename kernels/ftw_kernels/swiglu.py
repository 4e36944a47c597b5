"""SwiGLU h = silu(g) * u, elementwise, with a backward that needs only g and u.

`swiglu_backward` is shared with the fused LoRA MLP, which has it write dg and du over g and u, and h,
recomputed for the down projection's LoRA grads, over dh (no new activation-sized buffers). With LoRA's
dropout on the down projection, the kernels also write h as its rank-r term reads it, dropped, in the same
pass (kernels/ftw_kernels/lora_dropout.py draws the same mask): no second pass reads h again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.lora_dropout import BLOCK, Dropout, dropped, flat_draws, keep_scaled


@triton.jit
def _swiglu_fwd_part(G, U, H, HD, offs, n, r, p, scale, DROP: tl.constexpr):
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    h = (g * tl.sigmoid(g) * u).to(H.dtype.element_ty)
    tl.store(H + offs, h, mask=mask)
    if DROP:
        tl.store(HD + offs, keep_scaled(h, r, p, scale).to(HD.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed a step: no variant compiled for one
def _swiglu_fwd(G, U, H, HD, n, seed, p, scale, BLOCK: tl.constexpr, DROP: tl.constexpr):
    if DROP:  # four quarters, each with one of Philox's four draws: lora_dropout's counters
        QUARTER: tl.constexpr = BLOCK // 4
        first = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, QUARTER)
        r0, r1, r2, r3 = flat_draws(seed, QUARTER)
        _swiglu_fwd_part(G, U, H, HD, first, n, r0, p, scale, DROP)
        _swiglu_fwd_part(G, U, H, HD, first + QUARTER, n, r1, p, scale, DROP)
        _swiglu_fwd_part(G, U, H, HD, first + 2 * QUARTER, n, r2, p, scale, DROP)
        _swiglu_fwd_part(G, U, H, HD, first + 3 * QUARTER, n, r3, p, scale, DROP)
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _swiglu_fwd_part(G, U, H, HD, offs, n, 0.0, p, scale, DROP)


@triton.jit
def _swiglu_bwd_part(DH, G, U, H, DG, DU, offs, n, r, p, scale, WRITE_H: tl.constexpr, DROP: tl.constexpr):
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
    if WRITE_H:  # last: H may be DH's memory
        h = (silu * u).to(H.dtype.element_ty)
        if DROP:
            h = keep_scaled(h, r, p, scale).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed a step: no variant compiled for one
def _swiglu_bwd(DH, G, U, H, DG, DU, n, seed, p, scale, BLOCK: tl.constexpr, WRITE_H: tl.constexpr,
                DROP: tl.constexpr):  # fmt: skip
    if DROP:  # as _swiglu_fwd
        QUARTER: tl.constexpr = BLOCK // 4
        first = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, QUARTER)
        r0, r1, r2, r3 = flat_draws(seed, QUARTER)
        _swiglu_bwd_part(DH, G, U, H, DG, DU, first, n, r0, p, scale, WRITE_H, DROP)
        _swiglu_bwd_part(DH, G, U, H, DG, DU, first + QUARTER, n, r1, p, scale, WRITE_H, DROP)
        _swiglu_bwd_part(DH, G, U, H, DG, DU, first + 2 * QUARTER, n, r2, p, scale, WRITE_H, DROP)
        _swiglu_bwd_part(DH, G, U, H, DG, DU, first + 3 * QUARTER, n, r3, p, scale, WRITE_H, DROP)
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        _swiglu_bwd_part(DH, G, U, H, DG, DU, offs, n, 0.0, p, scale, WRITE_H, DROP)


def _drop_args(g: torch.Tensor, dropout: Dropout | None) -> tuple[int, float, float, bool]:
    """(seed, p, scale, whether the kernel drops): it does when g's rows draw their mask block by block in
    flat order (a contiguous width that is a multiple of BLOCK: every model's intermediate size we know)."""
    if dropout is None or not (g.is_contiguous() and g.shape[-1] % BLOCK == 0):
        return 0, 0.0, 1.0, False
    return dropout.seed, float(dropout.p), 1.0 / (1.0 - dropout.p), True


def swiglu_forward_raw(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return swiglu_forward_dropped(g, u, None)[0]


def swiglu_forward_dropped(g: torch.Tensor, u: torch.Tensor, dropout: Dropout | None):
    """(h, h after `dropout`, None without it): both written by one pass where the width allows."""
    h = torch.empty_like(g)
    seed, p, scale, drop = _drop_args(g, dropout)
    hd = torch.empty_like(g) if drop else None
    n = g.numel()
    _swiglu_fwd[(triton.cdiv(n, BLOCK),)](g, u, h, hd if drop else h, n, seed, p, scale, BLOCK=BLOCK, DROP=drop)
    if dropout is not None and not drop:
        hd = dropped(h.view(-1, h.shape[-1]), dropout).view(h.shape)
    return h, hd


def swiglu_backward(dh, g, u, dg, du, want_h: bool, dropout: Dropout | None = None) -> torch.Tensor | None:
    """Write dL/dg and dL/du into dg and du (they may be g and u themselves: in place);
    return h = silu(g)*u, recomputed, when asked: written over dh (each element's dh is read before its h
    is stored; dh is spent by then), which saves a tokens × intermediate buffer at the MLP backward's peak.
    With `dropout`, the h returned is h after it (what the down projection's rank-r term read)."""
    if want_h:
        h = dh if dh.dtype == g.dtype and dh.is_contiguous() else torch.empty_like(g)
    else:
        h = g
    seed, p, scale, drop = _drop_args(g, dropout if want_h else None)
    n = g.numel()
    _swiglu_bwd[(triton.cdiv(n, BLOCK),)](
        dh, g, u, h, dg, du, n, seed, p, scale, BLOCK=BLOCK, WRITE_H=want_h, DROP=drop
    )
    if want_h and dropout is not None and not drop:
        dropped(h.view(-1, h.shape[-1]), dropout, out=h.view(-1, h.shape[-1]))
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

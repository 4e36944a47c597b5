"""Fused LoRA projections with hand-written backwards.

y = x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ for frozen W and trainable A, B. Autograd through PEFT keeps, per
projection, the input and the rank-sized intermediates of each matmul, and for the gated MLP also
silu(g) and silu(g)·u. Here:
- `LoRAProjections` runs several projections of one input (q, k, v; or o alone), saves the input
  once plus the (tokens × r) x·Aᵀ, and sums dx with in-place addmm.
- `LoRAGatedMLP` runs gate/up/down with the SwiGLU kernel between; it saves x, g and u only and
  recomputes h = silu(g)·u inside the backward's one elementwise pass, which writes dg and du over
  g and u (no new activation-sized buffers).
Adapter weights (fp32 when PEFT upcasts them) are cast to the activation dtype for the matmuls;
their gradients come back in their own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.precision import compute_dtype, no_autocast
from kernels.swiglu import swiglu_backward, swiglu_forward_raw


@dataclass(frozen=True)
class Projection:
    """The tensors of one linear layer, LoRA or not (A, B and scale are None/0 for a plain one)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scale: float


def projection_of(module: torch.nn.Module) -> Projection | None:
    """A PEFT lora.Linear (one active adapter, no dropout/DoRA, not merged) or a plain Linear;
    None when the module is in a state these kernels do not reproduce."""
    if isinstance(module, torch.nn.Linear):
        return Projection(module.weight, module.bias, None, None, 0.0)
    base = getattr(module, "base_layer", None)
    if not isinstance(base, torch.nn.Linear) or getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if module.use_dora.get(name) or not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    return Projection(base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))


def _lora_fwd(x2: torch.Tensor, p: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = None if p.bias is None else p.bias.to(x2.dtype)
    y = torch.nn.functional.linear(x2, p.weight.to(x2.dtype), bias)
    if p.lora_a is None:
        return y, None
    xa = x2 @ p.lora_a.to(x2.dtype).t()
    return y.addmm_(xa, p.lora_b.to(x2.dtype).t(), alpha=p.scale), xa


def _lora_bwd(dy: torch.Tensor, inp: torch.Tensor, xa: torch.Tensor | None, w, a, bb, s: float,
              dx: torch.Tensor | None, want_dx: bool):
    """(dL/dinput accumulated into dx — started by this call when dx is None —, dA, dB)."""
    if want_dx:
        w = w.to(dy.dtype)
        dx = dy @ w if dx is None else dx.addmm_(dy, w)
    if a is None:
        return dx, None, None
    dyb = dy @ bb.to(dy.dtype)
    if want_dx:
        dx.addmm_(dyb, a.to(dy.dtype), alpha=s)
    ga = (dyb.t() @ inp).mul_(s).to(a.dtype) if a.requires_grad else None
    gb = (dy.t() @ xa).mul_(s).to(bb.dtype) if bb.requires_grad else None
    return dx, ga, gb


class LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: tuple[float, ...], *params):
        dtype = compute_dtype(x)  # read before autocast is switched off
        with no_autocast(x):
            return LoRAProjections._forward(ctx, x, dtype, scales, *params)

    @staticmethod
    def _forward(ctx, x, dtype, scales, *params):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        outs, xas = [], []
        for i, s in enumerate(scales):
            y, xa = _lora_fwd(x2, Projection(*params[4 * i: 4 * i + 4], s))
            xas.append(xa)
            outs.append(y.view(*x.shape[:-1], -1))
        ctx.save_for_backward(x2, *params, *xas)
        ctx.scales, ctx.shape, ctx.x_dtype = scales, x.shape, x.dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        x2, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        params, xas = rest[: 4 * n], rest[4 * n:]
        dx, want_dx = None, ctx.needs_input_grad[0]
        grads: list[torch.Tensor | None] = []
        for i, s in enumerate(ctx.scales):
            w, b, a, bb = params[4 * i: 4 * i + 4]
            dy = douts[i].reshape(-1, w.shape[0])
            gw = dy.t() @ x2 if w.requires_grad else None
            gb = dy.sum(0) if b is not None and b.requires_grad else None
            dx, ga, gbb = _lora_bwd(dy, x2, xas[i], w, a, bb, s, dx, want_dx)
            grads += [gw, gb, ga, gbb]
        return (dx.view(ctx.shape).to(ctx.x_dtype) if dx is not None else None), None, *grads


def lora_projections(x: torch.Tensor, projections: list[Projection]) -> tuple[torch.Tensor, ...]:
    flat = [t for p in projections for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    return LoRAProjections.apply(x, tuple(p.scale for p in projections), *flat)


class LoRAGatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: tuple[float, float, float], *params):
        dtype = compute_dtype(x)  # read before autocast is switched off
        with no_autocast(x):
            return LoRAGatedMLP._forward(ctx, x, dtype, scales, *params)

    @staticmethod
    def _forward(ctx, x, dtype, scales, *params):
        gate, up, down = (Projection(params[3 * i], None, params[3 * i + 1], params[3 * i + 2], scales[i]) for i in range(3))
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        g, xag = _lora_fwd(x2, gate)
        u, xau = _lora_fwd(x2, up)
        h = swiglu_forward_raw(g, u)
        y, had = _lora_fwd(h, down)
        del h
        ctx.save_for_backward(x2, g, u, xag, xau, had, *params)
        ctx.scales, ctx.shape, ctx.x_dtype = scales, x.shape, x.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, g, u, xag, xau, had, *params = ctx.saved_tensors
        wg, ag, bg, wu, au, bu, wd, ad, bd = params
        sg, su, sd = ctx.scales
        if wg.requires_grad or wu.requires_grad or wd.requires_grad:
            raise RuntimeError("LoRAGatedMLP is for frozen base weights; full fine-tuning uses the plain MLP")
        dy = dy.reshape(-1, dy.shape[-1])
        dh = dy @ wd.to(dy.dtype)
        dyb = None
        if ad is not None:
            dyb = dy @ bd.to(dy.dtype)
            dh.addmm_(dyb, ad.to(dy.dtype), alpha=sd)
        # one pass: h recomputed (for dA_down), dg and du written over g and u
        h = swiglu_backward(dh, g, u, g, u, want_h=ad is not None and ad.requires_grad)
        del dh
        gad = gbd = None
        if ad is not None:
            gad = (dyb.t() @ h).mul_(sd).to(ad.dtype) if h is not None else None
            gbd = (dy.t() @ had).mul_(sd).to(bd.dtype) if bd.requires_grad else None
        del h
        want_dx = ctx.needs_input_grad[0]
        dx, gag, gbg = _lora_bwd(g, x2, xag, wg, ag, bg, sg, None, want_dx)
        dx, gau, gbu = _lora_bwd(u, x2, xau, wu, au, bu, su, dx, want_dx)
        dx = dx.view(ctx.shape).to(ctx.x_dtype) if dx is not None else None
        return dx, None, None, gag, gbg, None, gau, gbu, None, gad, gbd


def lora_gated_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    params = [t for p in (gate, up, down) for t in (p.weight, p.lora_a, p.lora_b)]
    return LoRAGatedMLP.apply(x, (gate.scale, up.scale, down.scale), *params)

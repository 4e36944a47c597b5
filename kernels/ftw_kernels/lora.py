"""Fused LoRA projections with hand-written backwards, over a floating-point, a bitsandbytes 4-bit or 8-bit (QLoRA,
`load_in_8bit`: dequantised per matmul, never saved dense) or a float8 base weight (`fp8_base_weights`);
kernels/ftw_kernels/base_weight.py runs the base matmuls in each storage, kernels/ftw_kernels/lora_products.py the
products of a group (the stacked A's, s·B copies, the adapters' grads).

y = x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ for frozen W and trainable A, B. Autograd through PEFT keeps, per
projection, the input and the rank-sized intermediates of each matmul, and for the gated MLP also
silu(g) and silu(g)·u. Here:
- `LoRAProjections` runs several projections of one input (q, k, v; or o alone), saves the input
  once plus the (tokens × Σr) x·[A₁;…;Aₙ]ᵀ, and sums dx with in-place addmm.
- `LoRAGatedMLP` runs gate/up/down with the SwiGLU kernel between; it saves x, g and u only and
  recomputes h = silu(g)·u inside the backward's one elementwise pass, which writes dg and du over
  g and u and h over dh (no new activation-sized buffers).
LoRA's dropout runs inside (kernels/ftw_kernels/lora_dropout.py): the rank-r terms read the dropped input, one mask
an input, never stored.
"""

from __future__ import annotations

import torch

from ftw_kernels import bordered
from ftw_kernels.base_weight import save_for_backward, saved_tensors, usable
from ftw_kernels.lora_dropout import Dropout, draw, dropped
from ftw_kernels.lora_products import (
    Projection,
    adapters,
    input_grad,
    input_kept,
    input_of,
    low_rank_grads,
    project,
    weight_grads,
)
from ftw_kernels.precision import compute_dtype, no_autocast
from ftw_kernels.swiglu import swiglu_backward, swiglu_backward_term, swiglu_forward_dropped, term_fits


def projection_of(module: torch.nn.Module) -> Projection | None:
    """A PEFT lora.Linear (one active adapter, no DoRA, not merged; dropout over a frozen base) or a plain Linear,
    over a floating-point, bitsandbytes 4-bit or 8-bit, or float8 base weight (kernels/ftw_kernels/base_weight.py);
    None when the module is in a state these kernels do not reproduce."""
    if isinstance(module, torch.nn.Linear):
        return Projection(module.weight, module.bias, None, None, 0.0) if usable(module.weight) else None
    base = getattr(module, "base_layer", None)
    if (
        not isinstance(base, torch.nn.Linear)
        or not usable(base.weight)
        or getattr(module, "merged", False)
        or getattr(module, "disable_adapters", False)
    ):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    p = _dropout_p(module.lora_dropout[name])
    # with dropout the backward keeps the dropped input only, which a trained base weight's grad cannot use
    if module.use_dora.get(name) or p is None or p and base.weight.requires_grad:
        return None
    lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
    return Projection(base.weight, base.bias, lora_a, lora_b, float(module.scaling[name]), p)


def _dropout_p(module: torch.nn.Module) -> float | None:
    """The probability PEFT's dropout module zeroes an element with now; None for a module these kernels do not
    reproduce."""
    if isinstance(module, torch.nn.Identity):
        return 0.0
    if type(module) is torch.nn.Dropout and not module.inplace:
        return float(module.p) if module.training else 0.0
    return None


def shared_dropout(projections: list[Projection]) -> float | None:
    """The dropout probability the LoRA projections of one input share (they share its mask); None when they
    differ."""
    found = {p.dropout for p in projections if p.lora_a is not None}
    if len(found) > 1:
        return None
    return found.pop() if found else 0.0


class LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: tuple[float, ...], room: int, dropout: Dropout | None, *params):
        dtype = compute_dtype(x)  # read before autocast is switched off
        with no_autocast(x):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            x_lora = None if dropout is None else dropped(x2, dropout)
            projections = _projections(params, scales)
            copies = adapters(projections, dtype)
            outs, xa = project(x2, projections, room, lora_input=x_lora, copies=copies)
        # the backward reads the input only for the A grads: the dropped copy, when there is one
        save_for_backward(ctx, *input_kept(ctx, x2 if x_lora is None else x_lora, xa), *params)
        ctx.scales, ctx.dropout, ctx.shape, ctx.x_dtype, ctx.copies = scales, dropout, x.shape, x.dtype, copies
        return tuple(y.view(*x.shape[:-1], -1) for y in outs)

    @staticmethod
    def backward(ctx, *douts):
        kept, xa, *params = saved_tensors(ctx)
        x_lora, xa = input_of(ctx, kept, xa)
        projections = _projections(params, ctx.scales)
        dys = [d.reshape(-1, d.shape[-1]) for d in douts]
        low = low_rank_grads(dys, projections, xa, ctx.copies)
        dx = input_grad(dys, low, projections, ctx.dropout) if ctx.needs_input_grad[0] else None
        grads = weight_grads(dys, low, x_lora, xa, projections)
        return (dx.view(ctx.shape).to(ctx.x_dtype) if dx is not None else None), None, None, None, *grads


def _projections(params, scales) -> list[Projection]:
    return [Projection(*params[4 * i : 4 * i + 4], s) for i, s in enumerate(scales)]


def lora_projections(x: torch.Tensor, projections: list[Projection]) -> tuple[torch.Tensor, ...]:
    """The projections of one input; their LoRA dropout (`shared_dropout`) draws one mask for all of them."""
    flat = [t for p in projections for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    dropout = draw(_shared(projections))
    return LoRAProjections.apply(x, tuple(p.scale for p in projections), bordered.room_of(x), dropout, *flat)


def _shared(projections: list[Projection]) -> float:
    p = shared_dropout(projections)
    if p is None:
        raise ValueError("fused LoRA projections of one input share one dropout mask: their lora_dropout differs")
    return p


class LoRAGatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        scales: tuple[float, float, float],
        room: int,
        checkpoint: str | None,
        dropouts: tuple[Dropout | None, Dropout | None],
        *params,
    ):
        dtype = compute_dtype(x)  # read before autocast is switched off
        x_drop, h_drop = dropouts  # gate and up's input's, down's
        with no_autocast(x):
            gate, up, down = _mlp_projections(params, scales)
            copies = adapters([gate, up], dtype), adapters([down], dtype)  # the backward's too
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            x_lora = None if x_drop is None else dropped(x2, x_drop)
            (g, u), xa = project(x2, [gate, up], room, lora_input=x_lora, copies=copies[0])
            if checkpoint == "recompute":  # nothing reads y; the gated MLP maps hidden to hidden
                y, had = g.new_empty(x2.shape), None
            else:
                stream = None if residual is None else residual.reshape(-1, residual.shape[-1])
                h, h_lora = swiglu_forward_dropped(g, u, h_drop)  # h dropped in the same pass
                (y,), had = project(h, [down], addend=stream, lora_input=h_lora, copies=copies[1])
            if checkpoint is not None:  # a recompute must save what the first forward saved
                had = None  # formed by the backward from the h it recomputes
        kept, xa = input_kept(ctx, x2 if x_lora is None else x_lora, xa)
        save_for_backward(ctx, kept, g, u, xa, had, *params)
        ctx.scales, ctx.dropouts, ctx.shape, ctx.x_dtype, ctx.copies = scales, dropouts, x.shape, x.dtype, copies
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        kept, g, u, xa, had, *params = saved_tensors(ctx)
        x_lora, xa = input_of(ctx, kept, xa)
        x_drop, h_drop = ctx.dropouts
        gate, up, down = _mlp_projections(params, ctx.scales)
        if any(p.weight.requires_grad for p in (gate, up, down)):
            raise RuntimeError("LoRAGatedMLP is for frozen base weights; full fine-tuning uses the plain MLP")
        dy = dy.reshape(-1, dy.shape[-1])
        formed = had is None and down.lora_a is not None
        want_h = formed or down.lora_a is not None and down.lora_a.requires_grad
        gate_up_copies, down_copies = ctx.copies
        low = low_rank_grads([dy], [down], had, down_copies)
        # in h's dtype: the term's operand and h·A_downᵀ's (dy's, which dyb's A's are in, unless the stream is wider)
        a_down = low.a_rows if dy.dtype == g.dtype else adapters([down], g.dtype, down_copies)[0]
        # down's rank-r term of dh inside the SwiGLU backward's pass where it fits, else written for the GEMM to add to
        inside = want_h and a_down is not None and dy.dtype == g.dtype and term_fits(g, a_down)
        dh = input_grad([dy], low, [down], h_drop, with_terms=not inside)
        # one pass: dg and du written over g and u, h recomputed (for dA_down, and h·A_downᵀ if not saved) over dh,
        # dropped, as down's rank-r term read it
        if inside:
            h = swiglu_backward_term(dh, g, u, low.dyb, a_down, h_drop)
        else:
            h = swiglu_backward(dh, g, u, g, u, want_h=want_h, dropout=h_drop)
        del dh
        if formed:
            had = h @ a_down.t()
        down_grads = weight_grads([dy], low, h, had, [down])
        del h
        low = low_rank_grads([g, u], [gate, up], xa, gate_up_copies)
        dx = input_grad([g, u], low, [gate, up], x_drop) if ctx.needs_input_grad[0] else None
        gate_grads = weight_grads([g, u], low, x_lora, xa, [gate, up])
        dx = dx.view(ctx.shape).to(ctx.x_dtype) if dx is not None else None
        # the Function's inputs per projection are (weight, lora_a, lora_b): no bias slot
        grads = [t for i, t in enumerate(gate_grads + down_grads) if i % 4 != 1]
        # the residual stream joined y as a plain add: its grad is y's
        stream = dy.view(ctx.shape[:-1] + (dy.shape[-1],)) if ctx.needs_input_grad[1] else None
        return dx, stream, None, None, None, None, *grads


def _mlp_projections(params, scales) -> list[Projection]:
    return [Projection(params[3 * i], None, params[3 * i + 1], params[3 * i + 2], scales[i]) for i in range(3)]


def lora_gated_mlp(
    x: torch.Tensor,
    gate: Projection,
    up: Projection,
    down: Projection,
    residual: torch.Tensor | None = None,
    checkpoint: str | None = None,
) -> torch.Tensor:
    """The gated MLP of x; given the `residual` stream it joins (a decoder layer's), residual + MLP(x), the add
    inside the down projection's GEMMs (cuBLAS's beta) instead of a pass of its own. `checkpoint`: the pass of a
    checkpointed layer this is, "forward" or "recompute". Then the backward forms h·A_downᵀ from the h it
    recomputes anyway, and the recompute, whose output nothing reads, runs neither the SwiGLU nor the down
    projection: it returns uninitialised memory of the output's shape. LoRA's dropout draws one mask for gate and
    up's input and one for down's, in every pass (a recompute's draws must be its first forward's)."""
    params = [t for p in (gate, up, down) for t in (p.weight, p.lora_a, p.lora_b)]
    scales = (gate.scale, up.scale, down.scale)
    room = bordered.room_of(x)
    dropouts = (draw(_shared([gate, up])), draw(down.dropout))
    if residual is not None and residual.dtype != compute_dtype(x):  # e.g. an fp32 stream under bf16 autocast
        return residual + LoRAGatedMLP.apply(x, None, scales, room, checkpoint, dropouts, *params)
    return LoRAGatedMLP.apply(x, residual, scales, room, checkpoint, dropouts, *params)

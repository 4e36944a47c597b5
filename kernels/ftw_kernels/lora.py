"""Fused LoRA projections with hand-written backwards, over a floating-point, a bitsandbytes 4-bit or 8-bit (QLoRA,
`load_in_8bit`: dequantised per matmul, never saved dense) or a float8 base weight (`fp8_base_weights`);
kernels/ftw_kernels/base_weight.py runs the base matmuls in each storage.

y = x Wᵀ (+ b) + s · (x Aᵀ) Bᵀ for frozen W and trainable A, B. Autograd through PEFT keeps, per
projection, the input and the rank-sized intermediates of each matmul, and for the gated MLP also
silu(g) and silu(g)·u. Here:
- `LoRAProjections` runs several projections of one input (q, k, v; or o alone), saves the input
  once plus the (tokens × Σr) x·[A₁;…;Aₙ]ᵀ, and sums dx with in-place addmm.
- `LoRAGatedMLP` runs gate/up/down with the SwiGLU kernel between; it saves x, g and u only and
  recomputes h = silu(g)·u inside the backward's one elementwise pass, which writes dg and du over
  g and u and h over dh (no new activation-sized buffers).
The rank-r down-projections that share an input are one GEMM against the stacked A's, forward
(x·[A₁;…;Aₙ]ᵀ) and backward (the A grads as [s₁dy₁B₁ … sₙdyₙBₙ]ᵀ·x, and their dx term as one GEMM):
the tokens × hidden input is read once instead of n times. Adapter weights (fp32 when PEFT upcasts them)
come in the compute dtype from `ftw_kernels.adapter_copies`, cast once per optimizer step, each B with
its scale folded in (s·B): no matmul scales its output or its accumulator, and unequal scales cost no
scaled copy of the A's. Their gradients come back in their own dtype. LoRA's dropout runs inside
(kernels/ftw_kernels/lora_dropout.py): the rank-r terms read the dropped input, one mask an input, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftw_kernels import bordered
from ftw_kernels.adapter_copies import stacked
from ftw_kernels.base_weight import accumulates, add_input_grad, linear, save_for_backward, saved_tensors, usable
from ftw_kernels.lora_dropout import Dropout, draw, dropped, rank_terms_dropped
from ftw_kernels.precision import compute_dtype, no_autocast
from ftw_kernels.rank_grads import fusable, rank_grads
from ftw_kernels.swiglu import swiglu_backward, swiglu_backward_term, swiglu_forward_dropped, term_fits


@dataclass(frozen=True)
class Projection:
    """The tensors of one linear layer, LoRA or not (A, B and scale are None/0 for a plain one), and the
    probability with which LoRA's dropout zeroes its input now (0 in eval mode)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scale: float
    dropout: float = 0.0


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


def _rank_rows(projections: list[Projection]) -> list[slice | None]:
    """Each LoRA projection's rows in the stacked A (None for a plain one)."""
    rows, start = [], 0
    for p in projections:
        rows.append(None if p.lora_a is None else slice(start, start + p.lora_a.shape[0]))
        start += 0 if p.lora_a is None else p.lora_a.shape[0]
    return rows


def _adapters(
    projections: list[Projection], dtype: torch.dtype
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(the A's of the LoRA projections stacked, each projection's s·B or None), in `dtype`: with the scale
    inside B's copy, every matmul below adds with beta and alpha 1 and no grad takes a scaling pass but B's.
    A bordered weight's s·B is its slot (kernels/ftw_kernels/bordered.py)."""
    lora = [p for p in projections if p.lora_a is not None]
    if not lora:
        return None, [None] * len(projections)
    slots = [_slot(p.weight, dtype) for p in lora]
    a_rows, *bs = stacked(
        [[p.lora_a for p in lora], *[[p.lora_b] for p in lora]], dtype, [1.0, *(p.scale for p in lora)], [None, *slots]
    )
    found = iter(bs)
    return a_rows, [None if p.lora_a is None else next(found) for p in projections]


def _slot(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    border = bordered.border_of(weight)
    return border[1] if border is not None and border[1].dtype == dtype else None


def _forward(
    x2: torch.Tensor,
    projections: list[Projection],
    room: int = 0,
    addend: torch.Tensor | None = None,
    lora_input: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(each projection of x2, x2·[A₁;…;Aₙ]ᵀ over the LoRA ones: tokens × Σr). With `room` spare columns beside
    x2's rows (a norm's output) and every weight bordered, x2·Aᵀ is written there and each projection is one GEMM
    over the bordered weight. `addend` (one projection's, not bordered): added to its output inside its GEMMs.
    `lora_input`: what the rank-r terms read instead of x2 (x2 after LoRA's dropout); the room then stays unused,
    since a view of it saved for the backward would keep x2 alive beside its dropped copy."""
    a_rows, bs = _adapters(projections, x2.dtype)
    wide = _widened(x2, projections, room, a_rows) if lora_input is None else None
    if wide is not None:
        xa = torch.mm(x2, a_rows.t(), out=wide[:, x2.shape[1] : x2.shape[1] + a_rows.shape[0]])  # type: ignore
        return [_bordered_linear(wide, p) for p in projections], xa
    xa = (x2 if lora_input is None else lora_input) @ a_rows.t() if a_rows is not None else None
    quantised: dict = {}  # x2 in float8, once for every float8 base
    return [
        linear(x2, p.weight, p.bias, quantised, None if b is None else (xa[:, rows], b), addend)
        for p, b, rows in zip(projections, bs, _rank_rows(projections))
    ], xa


def _widened(x2, projections: list[Projection], room: int, a_rows) -> torch.Tensor | None:
    """[x2 | its room] when every projection's weight is bordered, in x2's dtype, for this group: each one's s·B
    slot where its rows of x2·[A₁;…;Aₙ]ᵀ land (k's weight bordered after q's is not for k alone)."""
    if a_rows is None or not room:
        return None
    for p, rows in zip(projections, _rank_rows(projections)):
        border = bordered.border_of(p.weight)
        if rows is None or border is None or border[1].dtype != x2.dtype:
            return None
        buffer, slot = border
        if slot.storage_offset() - buffer.storage_offset() - x2.shape[1] != rows.start:
            return None
    return bordered.widened(x2, room, a_rows.shape[0])


def _bordered_linear(wide: torch.Tensor, p: Projection) -> torch.Tensor:
    """[x | x·Aᵀ]·[W | 0 … s·B]ᵀ (+ bias): the prefix of `wide` the weight's buffer spans."""
    buffer, _ = bordered.border_of(p.weight)  # type: ignore[misc]
    inputs = wide[:, : buffer.shape[1]]
    if p.bias is None:
        return inputs @ buffer.t()
    return torch.addmm(p.bias.to(wide.dtype), inputs, buffer.t())


def _low_rank_grads(
    dys: list[torch.Tensor], projections: list[Projection], xa: torch.Tensor | None
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """(dyb: the rows (sᵢBᵢ)ᵀ·dyᵢᵀ stacked, Σr × tokens, which dx's rank-r terms and the A grads share, or None
    without LoRA; each projection's B grad where one kernel formed it beside its rows of dyb, from one read of dyᵢ
    (kernels/ftw_kernels/rank_grads.py), else None). `xa`: the forward's x·[A₁;…;Aₙ]ᵀ, None when not at hand."""
    a_rows, bs = _adapters(projections, dys[0].dtype)
    b_grads: list[torch.Tensor | None] = [None] * len(projections)
    if a_rows is None:
        return None, b_grads
    dyb = dys[0].new_empty(a_rows.shape[0], dys[0].shape[0])
    for i, (p, dy, b, rows) in enumerate(zip(projections, dys, bs, _rank_rows(projections))):
        if b is None:
            continue
        if xa is not None and p.lora_b.requires_grad and fusable(dy, b, xa[:, rows]):
            b_grads[i] = rank_grads(dy, b, xa[:, rows], p.scale, dyb[rows], p.lora_b.dtype)
        else:
            torch.mm(b.t(), dy.t(), out=dyb[rows])
    return dyb, b_grads


def _input_grad(
    dys: list[torch.Tensor],
    dyb: torch.Tensor | None,
    projections: list[Projection],
    dropout: Dropout | None,
    with_terms: bool = True,
) -> torch.Tensor:
    """dL/dinput summed over the projections, from their dyᵢ and `_low_rank_grads`' dyb. `with_terms` False: the
    base GEMMs' part alone, for a caller that adds the rank-r terms in a pass of its own (the fused MLP's SwiGLU
    backward).

    The rank-r terms of dx are written first, one GEMM over the stacked A's (each projection's scale is in its
    rows of dyb), masked in place by the forward's `dropout`, and each base GEMM adds itself to them (cuBLAS's
    beta): no pass over dx is only an add. A float8 base, whose GEMM cannot accumulate, takes the terms after."""
    if dyb is None or not with_terms:
        return _base_input_grad(None, dys, projections)
    a_rows, _ = _adapters(projections, dys[0].dtype)
    if all(accumulates(p.weight) for p in projections):
        return _base_input_grad(_rank_terms(dyb, a_rows, dropout), dys, projections)
    dx = _base_input_grad(None, dys, projections)
    return dx.addmm_(dyb.t(), a_rows) if dropout is None else dx.add_(_rank_terms(dyb, a_rows, dropout))


def _rank_terms(dyb: torch.Tensor, a_rows: torch.Tensor, dropout: Dropout | None) -> torch.Tensor:
    """dx's rank-r terms, Σᵢ(sᵢdyᵢBᵢ)·Aᵢ, through the forward's dropout mask (its derivative)."""
    return dyb.t() @ a_rows if dropout is None else rank_terms_dropped(dyb, a_rows, dropout)


def _base_input_grad(dx: torch.Tensor | None, dys, projections: list[Projection]) -> torch.Tensor:
    """dx + Σᵢ dyᵢ·Wᵢ; a 4-bit weight is dequantised again here, never saved dense."""
    for p, dy in zip(projections, dys):
        dx = add_input_grad(dx, dy, p.weight)
    return dx


def _product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a·b in `dtype`. fp32 adapters (PEFT upcasts them) take their grads straight from the GEMM's fp32
    accumulators on CUDA: no bf16 product rounded, then cast in another kernel (~14 a layer, each a launch)."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _weight_grads(dys, dyb, b_grads, inp, xa, projections: list[Projection]) -> list[torch.Tensor | None]:
    """(dW, dbias, dA, dB) of each projection, in the parameters' dtypes (None where frozen); `b_grads`: the B grads
    `_low_rank_grads` formed already; `inp` may be None when no W or A trains."""
    trained_a = [p.lora_a for p in projections if p.lora_a is not None and p.lora_a.requires_grad]
    ga_rows = _product(dyb, inp, trained_a[0].dtype) if trained_a else None
    grads: list[torch.Tensor | None] = []
    for p, dy, rows, b_grad in zip(projections, dys, _rank_rows(projections), b_grads):
        grads.append(dy.t() @ inp if p.weight.requires_grad else None)
        grads.append(dy.sum(0) if p.bias is not None and p.bias.requires_grad else None)
        if p.lora_a is None:
            grads += [None, None]
            continue
        grads.append(ga_rows[rows].to(p.lora_a.dtype) if p.lora_a.requires_grad else None)
        if b_grad is None and p.lora_b.requires_grad:
            b_grad = _product(dy.t(), xa[:, rows], p.lora_b.dtype).mul_(p.scale)
        grads.append(b_grad)
    return grads


def _input_kept(ctx, x2: torch.Tensor, xa: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the backward keeps of the input: (x2, xa), or ([x2 | room], None) when xa was written into the room
    beside x2 (a bordered group): one dense tensor, which activation offloading moves (it keeps strided ones)."""
    whole = bordered.joined(x2, xa)
    ctx.split = None if whole is None else (x2.shape[1], xa.shape[1])  # type: ignore[union-attr]
    return (x2, xa) if whole is None else (whole, None)


def _input_of(ctx, kept: torch.Tensor, xa: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (kept, xa) if ctx.split is None else bordered.split(kept, *ctx.split)


class LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: tuple[float, ...], room: int, dropout: Dropout | None, *params):
        dtype = compute_dtype(x)  # read before autocast is switched off
        with no_autocast(x):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            x_lora = None if dropout is None else dropped(x2, dropout)
            outs, xa = _forward(x2, _projections(params, scales), room, lora_input=x_lora)
        # the backward reads the input only for the A grads: the dropped copy, when there is one
        save_for_backward(ctx, *_input_kept(ctx, x2 if x_lora is None else x_lora, xa), *params)
        ctx.scales, ctx.dropout, ctx.shape, ctx.x_dtype = scales, dropout, x.shape, x.dtype
        return tuple(y.view(*x.shape[:-1], -1) for y in outs)

    @staticmethod
    def backward(ctx, *douts):
        kept, xa, *params = saved_tensors(ctx)
        x_lora, xa = _input_of(ctx, kept, xa)
        projections = _projections(params, ctx.scales)
        dys = [d.reshape(-1, d.shape[-1]) for d in douts]
        dyb, b_grads = _low_rank_grads(dys, projections, xa)
        dx = _input_grad(dys, dyb, projections, ctx.dropout) if ctx.needs_input_grad[0] else None
        grads = _weight_grads(dys, dyb, b_grads, x_lora, xa, projections)
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
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            x_lora = None if x_drop is None else dropped(x2, x_drop)
            (g, u), xa = _forward(x2, [gate, up], room, lora_input=x_lora)
            if checkpoint == "recompute":  # nothing reads y; the gated MLP maps hidden to hidden
                y, had = g.new_empty(x2.shape), None
            else:
                stream = None if residual is None else residual.reshape(-1, residual.shape[-1])
                h, h_lora = swiglu_forward_dropped(g, u, h_drop)  # h dropped in the same pass
                (y,), had = _forward(h, [down], addend=stream, lora_input=h_lora)
            if checkpoint is not None:  # a recompute must save what the first forward saved
                had = None  # formed by the backward from the h it recomputes
        kept, xa = _input_kept(ctx, x2 if x_lora is None else x_lora, xa)
        save_for_backward(ctx, kept, g, u, xa, had, *params)
        ctx.scales, ctx.dropouts, ctx.shape, ctx.x_dtype = scales, dropouts, x.shape, x.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        kept, g, u, xa, had, *params = saved_tensors(ctx)
        x_lora, xa = _input_of(ctx, kept, xa)
        x_drop, h_drop = ctx.dropouts
        gate, up, down = _mlp_projections(params, ctx.scales)
        if any(p.weight.requires_grad for p in (gate, up, down)):
            raise RuntimeError("LoRAGatedMLP is for frozen base weights; full fine-tuning uses the plain MLP")
        dy = dy.reshape(-1, dy.shape[-1])
        formed = had is None and down.lora_a is not None
        want_h = formed or down.lora_a is not None and down.lora_a.requires_grad
        a_down = _adapters([down], g.dtype)[0]  # in h's dtype: the term's operand and h·A_downᵀ's
        # down's rank-r term of dh inside the SwiGLU backward's pass where it fits, else written for the GEMM to add to
        inside = want_h and a_down is not None and dy.dtype == g.dtype and term_fits(g, a_down)
        dyb, b_grads = _low_rank_grads([dy], [down], had)
        dh = _input_grad([dy], dyb, [down], h_drop, with_terms=not inside)
        # one pass: dg and du written over g and u, h recomputed (for dA_down, and h·A_downᵀ if not saved) over dh,
        # dropped, as down's rank-r term read it
        if inside:
            h = swiglu_backward_term(dh, g, u, dyb, a_down, h_drop)
        else:
            h = swiglu_backward(dh, g, u, g, u, want_h=want_h, dropout=h_drop)
        del dh
        if formed:
            had = h @ a_down.t()
        down_grads = _weight_grads([dy], dyb, b_grads, h, had, [down])
        del h
        dyb, b_grads = _low_rank_grads([g, u], [gate, up], xa)
        dx = _input_grad([g, u], dyb, [gate, up], x_drop) if ctx.needs_input_grad[0] else None
        gate_grads = _weight_grads([g, u], dyb, b_grads, x_lora, xa, [gate, up])
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

"""The products of a fused LoRA group (kernels/ftw_kernels/lora.py's autograd Functions): the forward's
projections of one input, dx with the rank-r terms inside the base GEMMs, and the adapters' grads; and what a
group's backward keeps of its input.

Adapter weights (fp32 when PEFT upcasts them) come in the compute dtype from `ftw_kernels.adapter_copies`, cast once
per optimizer step, each B with its scale folded in (s·B): no matmul scales its output or its accumulator, and
unequal scales cost no scaled copy of the A's. The rank-r down-projections that share an input are one GEMM against
the stacked A's, forward (x·[A₁;…;Aₙ]ᵀ) and backward (the A grads as [s₁dy₁B₁ … sₙdyₙBₙ]ᵀ·x, and their dx term as
one GEMM): the tokens × hidden input is read once instead of n times. Their gradients come back in their own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftw_kernels import bordered
from ftw_kernels.adapter_copies import stacked
from ftw_kernels.base_weight import accumulates, add_input_grad, linear
from ftw_kernels.lora_dropout import Dropout, rank_terms_dropped
from ftw_kernels.rank_grads import fusable, rank_grads


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


def rank_rows(projections: list[Projection]) -> list[slice | None]:
    """Each LoRA projection's rows in the stacked A (None for a plain one)."""
    rows, start = [], 0
    for p in projections:
        rows.append(None if p.lora_a is None else slice(start, start + p.lora_a.shape[0]))
        start += 0 if p.lora_a is None else p.lora_a.shape[0]
    return rows


Copies = tuple[torch.Tensor | None, list[torch.Tensor | None]]  # `adapters`': (stacked A's, each s·B)


def adapters(projections: list[Projection], dtype: torch.dtype, known: Copies | None = None) -> Copies:
    """(the A's of the LoRA projections stacked, each projection's s·B or None), in `dtype`: with the scale
    inside B's copy, every matmul below adds with beta and alpha 1 and no grad takes a scaling pass but B's.
    A bordered weight's s·B is its slot (kernels/ftw_kernels/bordered.py). `known`: the copies a group's forward
    looked up, kept for its backward (the same until the optimizer steps), taken where they are in `dtype`: the
    lookup is ~10 µs of host time a group, on a path the host paces in short steps."""
    if known is not None and (known[0] is None or known[0].dtype == dtype):
        return known
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


def project(
    x2: torch.Tensor,
    projections: list[Projection],
    room: int = 0,
    addend: torch.Tensor | None = None,
    lora_input: torch.Tensor | None = None,
    copies: Copies | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(each projection of x2, x2·[A₁;…;Aₙ]ᵀ over the LoRA ones: tokens × Σr). With `room` spare columns beside
    x2's rows (a norm's output) and every weight bordered, x2·Aᵀ is written there and each projection is one GEMM
    over the bordered weight. `addend` (one projection's, not bordered): added to its output inside its GEMMs.
    `lora_input`: what the rank-r terms read instead of x2 (x2 after LoRA's dropout); the room then stays unused,
    since a view of it saved for the backward would keep x2 alive beside its dropped copy. `copies`: `adapters`'
    result where the caller looked it up already."""
    a_rows, bs = adapters(projections, x2.dtype, copies)
    wide = _widened(x2, projections, room, a_rows) if lora_input is None else None
    if wide is not None:
        xa = torch.mm(x2, a_rows.t(), out=wide[:, x2.shape[1] : x2.shape[1] + a_rows.shape[0]])  # type: ignore
        return [_bordered_linear(wide, p) for p in projections], xa
    xa = (x2 if lora_input is None else lora_input) @ a_rows.t() if a_rows is not None else None
    quantised: dict = {}  # x2 in float8, once for every float8 base
    return [
        linear(x2, p.weight, p.bias, quantised, None if b is None else (xa[:, rows], b), addend)
        for p, b, rows in zip(projections, bs, rank_rows(projections))
    ], xa


def _widened(x2, projections: list[Projection], room: int, a_rows) -> torch.Tensor | None:
    """[x2 | its room] when every projection's weight is bordered, in x2's dtype, for this group: each one's s·B
    slot where its rows of x2·[A₁;…;Aₙ]ᵀ land (k's weight bordered after q's is not for k alone)."""
    if a_rows is None or not room:
        return None
    for p, rows in zip(projections, rank_rows(projections)):
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


@dataclass(frozen=True)
class LowRank:
    """What a group's backward forms first and the rest of it reads: the stacked A's it multiplies dyb by, dyb (the
    rows (sᵢBᵢ)ᵀ·dyᵢᵀ stacked, Σr × tokens, which dx's rank-r terms and the A grads share; None without LoRA), and
    each projection's B grad where one kernel formed it beside its rows of dyb (else None)."""

    a_rows: torch.Tensor | None
    dyb: torch.Tensor | None
    b_grads: list[torch.Tensor | None]


def low_rank_grads(
    dys: list[torch.Tensor], projections: list[Projection], xa: torch.Tensor | None, copies: Copies | None = None
) -> LowRank:
    """dyb, and each B grad from the same read of dyᵢ where kernels/ftw_kernels/rank_grads.py takes it. `xa`: the
    forward's x·[A₁;…;Aₙ]ᵀ, None when not at hand; `copies`: the forward's adapter copies."""
    a_rows, bs = adapters(projections, dys[0].dtype, copies)
    b_grads: list[torch.Tensor | None] = [None] * len(projections)
    if a_rows is None:
        return LowRank(None, None, b_grads)
    dyb = dys[0].new_empty(a_rows.shape[0], dys[0].shape[0])
    for i, (p, dy, b, rows) in enumerate(zip(projections, dys, bs, rank_rows(projections))):
        if b is None:
            continue
        if xa is not None and p.lora_b.requires_grad and fusable(dy, b, xa[:, rows]):
            b_grads[i] = rank_grads(dy, b, xa[:, rows], p.scale, dyb[rows], p.lora_b.dtype)
        else:
            torch.mm(b.t(), dy.t(), out=dyb[rows])
    return LowRank(a_rows, dyb, b_grads)


def input_grad(
    dys: list[torch.Tensor],
    low: LowRank,
    projections: list[Projection],
    dropout: Dropout | None,
    with_terms: bool = True,
) -> torch.Tensor:
    """dL/dinput summed over the projections, from their dyᵢ and `low_rank_grads`' dyb. `with_terms` False: the
    base GEMMs' part alone, for a caller that adds the rank-r terms in a pass of its own (the fused MLP's SwiGLU
    backward).

    The rank-r terms of dx are written first, one GEMM over the stacked A's (each projection's scale is in its
    rows of dyb), masked in place by the forward's `dropout`, and each base GEMM adds itself to them (cuBLAS's
    beta): no pass over dx is only an add. A float8 base, whose GEMM cannot accumulate, takes the terms after."""
    if low.dyb is None or low.a_rows is None or not with_terms:
        return _base_input_grad(None, dys, projections)
    dyb, a_rows = low.dyb, low.a_rows
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


def weight_grads(dys, low: LowRank, inp, xa, projections: list[Projection]) -> list[torch.Tensor | None]:
    """(dW, dbias, dA, dB) of each projection, in the parameters' dtypes (None where frozen); the B grads
    `low_rank_grads` formed already are taken as they are; `inp` may be None when no W or A trains."""
    trained_a = [p.lora_a for p in projections if p.lora_a is not None and p.lora_a.requires_grad]
    ga_rows = _product(low.dyb, inp, trained_a[0].dtype) if trained_a else None
    grads: list[torch.Tensor | None] = []
    for p, dy, rows, b_grad in zip(projections, dys, rank_rows(projections), low.b_grads):
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


def input_kept(ctx, x2: torch.Tensor, xa: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the backward keeps of the input: (x2, xa), or ([x2 | room], None) when xa was written into the room
    beside x2 (a bordered group): one dense tensor, which activation offloading moves (it keeps strided ones)."""
    whole = bordered.joined(x2, xa)
    ctx.split = None if whole is None else (x2.shape[1], xa.shape[1])  # type: ignore[union-attr]
    return (x2, xa) if whole is None else (whole, None)


def input_of(ctx, kept: torch.Tensor, xa: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (kept, xa) if ctx.split is None else bordered.split(kept, *ctx.split)

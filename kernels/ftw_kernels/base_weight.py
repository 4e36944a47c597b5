"""The frozen base weight of a fused LoRA projection in whichever storage it has, and the two matmuls the
fused functions (kernels/ftw_kernels/lora.py) need of it: the forward's x·Wᵀ and the backward's dy·W.

Floating point: as it is. bitsandbytes 4-bit (QLoRA) or 8-bit (`load_in_8bit`), kernels/ftw_kernels/qlora.py:
dequantised per matmul into a shared buffer. float8 (`fp8_base_weights`, kernels/ftw_kernels/fp8.py):
`torch._scaled_mm` over activations quantised per row. A 4-bit weight marked for float8 matmuls (`fp8_base_weights`
with QLoRA, `mark_fp8_matmuls`): dequantised into the shared buffer, quantised per output channel into a transient
float8 copy, then as float8; the forward and the backward quantise the same dequantised weight, so both
differentiate one operator. A quantised weight is kept on the autograd context as it is, never saved dense.
"""

from __future__ import annotations

from typing import Any

import torch

from ftw_kernels import fp8, qlora
from ftw_kernels.fp8_quant import quantise_rows

FP8_MATMULS = "ftw_fp8_matmuls"  # the attribute that marks a 4-bit weight for float8 matmuls


def usable(weight: torch.Tensor) -> bool:
    """A weight the fused functions can multiply by: floating point, quantised 4-bit or 8-bit, or float8."""
    return fp8.is_fp8(weight) or qlora.usable(weight)


def _stored(weight: torch.Tensor) -> bool:
    return fp8.is_fp8(weight) or qlora.is_quantised(weight)


def mark_fp8_matmuls(linear: torch.nn.Module) -> bool:
    """Run the matmuls of `linear`'s 4-bit weight in float8 (QLoRA with `fp8_base_weights`); False where its
    weight is not 4-bit or a dimension is no multiple of 16 (`torch._scaled_mm`'s rule)."""
    weight = getattr(linear, "weight", None)  # a LoRA wrapper's `weight` is its base layer's: not it
    if not isinstance(linear, torch.nn.Linear) or weight is None or not qlora.is_4bit(weight):
        return False
    rows, cols = weight.quant_state.shape  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    if rows % 16 or cols % 16:
        return False
    setattr(weight, FP8_MATMULS, True)
    return True


def _as_fp8(weight: torch.Tensor) -> fp8.Fp8Weight | None:
    """The weight its float8 matmuls take: itself when stored as float8, a transient `Fp8Weight` (per-output-channel
    scales) of a marked 4-bit one; None for any other."""
    if fp8.is_fp8(weight):
        return weight  # type: ignore[return-value]  # is_fp8: an Fp8Weight
    if not getattr(weight, FP8_MATMULS, False):
        return None
    data, scale = quantise_rows(qlora.dense(weight, weight.quant_state.dtype))  # type: ignore[attr-defined]
    return fp8.Fp8Weight(data, scale.view(1, -1))


def linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quantised: dict,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    addend: torch.Tensor | None = None,
) -> torch.Tensor:
    """x2·Wᵀ (+ bias) (+ xa·(s·B)ᵀ for `low_rank` = (xa, s·B)) (+ `addend`, e.g. the residual stream the output
    joins) in x2's dtype; `quantised`: one dict per input, where a float8 base keeps x2's fp8 copy for the next
    projection of the same input.

    Over a floating-point or bitsandbytes weight the rank-r term is written first, on top of the addend, and the base
    GEMM adds itself to it (cuBLAS's beta): the sums ride the GEMMs' epilogues instead of passes over the output.
    `torch._scaled_mm` cannot accumulate, so a float8 base adds them after."""
    as_fp8 = _as_fp8(weight)
    if as_fp8 is not None:
        y = fp8.linear(x2, as_fp8, quantised)
        for term in (bias, addend):
            if term is not None:
                y.add_(term.to(y.dtype))
        if low_rank is not None:
            xa, b = low_rank
            y.addmm_(xa, b.t())
        return y
    w = qlora.dense(weight, x2.dtype)
    bias = None if bias is None else bias.to(x2.dtype)
    start = addend if bias is None else (bias if addend is None else addend + bias)
    if low_rank is None:
        return torch.nn.functional.linear(x2, w, bias) if addend is None else torch.addmm(start, x2, w.t())
    xa, b = low_rank
    term = xa @ b.t() if start is None else torch.addmm(start, xa, b.t())
    return term.addmm_(x2, w.t())


def accumulates(weight: torch.Tensor) -> bool:
    """Whether the weight's matmuls can add themselves into an output already written (cuBLAS's beta): every
    storage but float8's `torch._scaled_mm`."""
    return not fp8.is_fp8(weight) and not getattr(weight, FP8_MATMULS, False)


def add_input_grad(dx: torch.Tensor | None, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dx + dy·W (dy·W when dx is None), in dy's dtype; a 4-bit or 8-bit weight is dequantised again here."""
    as_fp8 = _as_fp8(weight)
    if as_fp8 is not None:
        part = fp8.input_grad(dy, as_fp8)
        return part if dx is None else dx.add_(part)
    w = qlora.dense(weight, dy.dtype)
    return dy @ w if dx is None else dx.addmm_(dy, w)


def save_for_backward(ctx: Any, *tensors: torch.Tensor | None) -> None:
    """`ctx.save_for_backward`, but a quantised weight is kept on `ctx` as it is: saved-tensor hooks (the
    activation offloading of `gradient_checkpointing: offload`) hand a tensor subclass back detached, as a
    plain tensor without its `quant_state` or scales. It is a frozen parameter: keeping it costs nothing."""
    ctx.stored = {i: t for i, t in enumerate(tensors) if t is not None and _stored(t)}
    ctx.save_for_backward(*(None if i in ctx.stored else t for i, t in enumerate(tensors)))


def saved_tensors(ctx: Any) -> list[torch.Tensor | None]:
    """What `save_for_backward` saved, in its order."""
    return [ctx.stored.get(i, t) for i, t in enumerate(ctx.saved_tensors)]

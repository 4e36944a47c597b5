"""A bitsandbytes 4-bit weight (nf4 or fp4, nested statistics or not) dequantised in one Triton kernel.

QLoRA dequantises every base weight before each of its matmuls: twice a step, three times under
checkpointing (kernels/ftw_kernels/qlora.py). bitsandbytes' `dequantize_4bit` costs a Python wrapper,
two registered ops and, with nested (double-quantised) statistics, a dequantisation of the absmax
into a new tensor plus an add of the offset: three kernels and ~100 µs of host time per weight. A 1B
model's checkpointed step runs 336 of them, enough to leave the GPU waiting for the host (profiled:
docs/benchmarks.md). This kernel reads the packed bytes, the (nested) absmax and the code tables and
writes the weight, one launch, with bitsandbytes' arithmetic (code[nibble] · absmax in fp32, the
nested absmax as code₂[q] · absmax₂ + offset), so the result is bit-equal to its.
Storage stays bitsandbytes' `Params4bit`: the Hub's QLoRA checkpoints and users' configs use it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BYTES_PER_PROGRAM = 1024  # 2048 weights a program


@triton.jit
def _dequantise(
    PACKED,
    ABSMAX,
    CODE,
    ABSMAX_Q,
    CODE2,
    ABSMAX2,
    OFFSET,
    OUT,
    n_bytes,
    n_values,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BYTES: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    mask = offs < n_bytes
    packed = tl.load(PACKED + offs, mask=mask, other=0).to(tl.int32)
    block = (offs * 2) // BLOCKSIZE  # both nibbles of a byte lie in one block: blocksizes are even
    if NESTED:
        q = tl.load(ABSMAX_Q + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=mask, other=0.0) + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
    first = tl.load(CODE + (packed >> 4)) * scale  # the high nibble is the earlier weight
    second = tl.load(CODE + (packed & 15)) * scale
    pair = tl.interleave(first, second).to(OUT.dtype.element_ty)
    outs = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(OUT + outs, pair, mask=outs < n_values)  # an odd count: the last byte's low nibble is padding


def dequantise_into(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`weight` (a quantised bitsandbytes `Params4bit`) dequantised into `out` (its shape, its state's dtype)."""
    state = weight.quant_state  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    n_bytes, n_values = weight.numel(), state.shape.numel()
    if out.numel() != n_values or not out.is_contiguous():
        raise ValueError(f"out must be contiguous with {n_values} values (the weight's), not {out.numel()}")
    nested = bool(state.nested)
    absmax = state.absmax
    inner = state.state2 if nested else None
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _dequantise[grid](
        weight,
        absmax,
        state.code,
        absmax,  # the uint8 quantised absmax when nested
        inner.code if nested else absmax,  # unused pointers when not nested
        inner.absmax if nested else absmax,
        state.offset if nested else absmax,
        out,
        n_bytes,
        n_values,
        BLOCKSIZE=state.blocksize,
        BLOCKSIZE2=inner.blocksize if nested else 1,
        NESTED=nested,
        BYTES=BYTES_PER_PROGRAM,
    )
    return out

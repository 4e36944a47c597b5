"""bitsandbytes 4-bit weights (nf4, fp4; plain or double-quantised absmax) dequantised by one Triton kernel.

bitsandbytes' `dequantize_4bit` spends ~125 µs of host time per call (two kernels, a fresh absmax
buffer, the Python around them); a QLoRA step with checkpointing calls it hundreds of times, and the
1B step was measured host-bound on it (docs/benchmarks.md). This kernel does the same arithmetic in
one launch: the absmax of a block of `blocksize` values is code₂[q]·absmax₂ + offset when it is
double-quantised (bitsandbytes' own fp32 steps, rounded one at a time: no fused multiply-add, so the
result is bit-equal to bitsandbytes'), each byte holds two values (high nibble first), and a value is
code[nibble]·absmax, rounded once to the output dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv

BYTES_PER_PROGRAM = 1024  # 2,048 values


@triton.jit
def _dequantize_4bit(
    PACKED,
    CODE,
    ABSMAX,
    ABSMAX2,
    CODE2,
    OFFSET,
    OUT,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = byte < n_bytes
    packed = tl.load(PACKED + byte, mask=mask, other=0).to(tl.int32)
    block = byte * 2 // BLOCKSIZE
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(CODE2 + q) * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=mask, other=0.0)
        absmax = absmax + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + block, mask=mask, other=0.0)
    high = tl.load(CODE + (packed >> 4)) * absmax
    low = tl.load(CODE + (packed & 15)) * absmax
    values = tl.reshape(tl.join(high, low), [2 * BLOCK])  # interleaved: high₀, low₀, high₁, …
    out = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + out, values.to(OUT.dtype.element_ty), mask=out < 2 * n_bytes)


def supported(weight: torch.Tensor) -> bool:
    """A quantised `Params4bit` this kernel reproduces: an even number of values, blocks of an even size."""
    state = getattr(weight, "quant_state", None)
    return (
        state is not None
        and state.shape.numel() % 2 == 0
        and state.blocksize % 2 == 0
        and state.quant_type in ("nf4", "fp4")
        and (not state.nested or state.state2.absmax.dtype == torch.float32)
    )


def dequantize_4bit(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`weight`'s values written into `out` (its `quant_state.shape` values, any floating dtype); returns `out`."""
    state: Any = weight.quant_state  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    packed = weight.data.view(torch.uint8).reshape(-1)  # any quant_storage dtype holds the same bytes
    n_bytes = state.shape.numel() // 2
    if out.numel() != 2 * n_bytes or not out.is_contiguous():
        raise ValueError(f"out must be contiguous with {2 * n_bytes} values, got {tuple(out.shape)}")
    nested = bool(state.nested)
    absmax2 = state.state2.absmax if nested else state.absmax
    code2 = state.state2.code if nested else state.code
    offset = state.offset.reshape(1).float() if nested else state.absmax
    _dequantize_4bit[(cdiv(n_bytes, BYTES_PER_PROGRAM),)](
        packed,
        state.code,
        state.absmax,
        absmax2,
        code2,
        offset,
        out,
        n_bytes,
        BLOCKSIZE=state.blocksize,
        BLOCKSIZE2=state.state2.blocksize if nested else 1,
        NESTED=nested,
        BLOCK=BYTES_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    return out

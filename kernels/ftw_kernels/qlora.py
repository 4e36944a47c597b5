"""Frozen bitsandbytes 4-bit base weights (QLoRA) for the fused LoRA functions of kernels/ftw_kernels/lora.py.

A QLoRA projection keeps its base weight as a bitsandbytes `Params4bit` (nf4 or fp4, the storage
format of the Hub's QLoRA checkpoints). The fused functions need it dense for two matmuls only: the
forward's x·Wᵀ and the backward's dy·W. `dense` dequantises it for one matmul into a buffer shared
by every layer of the device (one per dtype, as large as the largest weight), which the next
dequantisation overwrites: ops on one CUDA stream run in order, so a matmul has read the buffer
before the next weight is written into it. The functions keep the packed `Params4bit` for backward
and dequantise again there, so autograd never holds a dequantised weight (PEFT's bitsandbytes path
through `bnb.matmul_4bit` does not either, but it saves the adapters' fp32 input copies and runs
every projection unfused).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def is_4bit(weight: torch.Tensor) -> bool:
    """A quantised bitsandbytes 4-bit weight (its `quant_state` says how to dequantise it)."""
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def usable(weight: torch.Tensor) -> bool:
    """A weight `dense` can hand to a matmul: floating point, or quantised 4-bit (not 8-bit ints,
    nor a `Params4bit` that was never quantised)."""
    if type(weight).__name__ == "Params4bit":
        return is_4bit(weight)
    return weight.is_floating_point()


def dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype` for one matmul. A 4-bit weight is dequantised into the device's shared
    buffer: the result is valid until the next call on that device, so use it at once, never save it."""
    if not is_4bit(weight):
        return weight.to(dtype)
    from bitsandbytes.functional import dequantize_4bit

    state = weight.quant_state  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    if weight.device.type != "cuda":  # bitsandbytes' CPU backend has no `out=` variant
        return dequantize_4bit(weight, state).to(dtype)
    numel = state.shape.numel()
    key = (weight.device, state.dtype)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _BUFFERS[key] = torch.empty(numel, dtype=state.dtype, device=weight.device)
    return dequantize_4bit(weight, state, out=buffer[:numel].view(state.shape)).to(dtype)

"""Frozen bitsandbytes 4-bit (QLoRA) and 8-bit (`load_in_8bit`) base weights for the fused LoRA functions of
kernels/ftw_kernels/lora.py.

A QLoRA projection keeps its base weight as a bitsandbytes `Params4bit` (nf4 or fp4, the storage
format of the Hub's QLoRA checkpoints). The fused functions need it dense for two matmuls only: the
forward's x·Wᵀ and the backward's dy·W. `dense` dequantises it (kernels/ftw_kernels/dequant.py, one
Triton launch) into a small cache of the most recently used weights, bounded by `keep_recent`: one
decoder layer's worth when the registry sets it. With checkpointing a layer's backward comes right
after its recomputed forward, so its seven weights are still there: each is dequantised twice per
step instead of three times. Without checkpointing the cache costs one layer's weights and saves
the last layer's backward. The functions keep the packed `Params4bit` for backward, so autograd never
holds a dequantised weight; the cache is bounded and shared, not per saved activation. Ops on one
CUDA stream run in order, so a matmul has read an evicted weight before its memory is reused.

An 8-bit weight (bitsandbytes' `Int8Params`: LLM.int8's int8 rows and each row's absmax in `SCB`) takes the same
cache, dequantised as bitsandbytes does (int8 · absmax / 127, in fp32, rounded once to the compute dtype). Its
matmuls then run in the compute dtype: the activations are not quantised to int8 as bitsandbytes' own matmul does
(nor split into outlier columns), so the result is the dequantised weight's, a little closer to the original
weight's than LLM.int8's.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


def is_4bit(weight: torch.Tensor) -> bool:
    """A quantised bitsandbytes 4-bit weight (its `quant_state` says how to dequantise it)."""
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def is_8bit(weight: torch.Tensor) -> bool:
    """A quantised bitsandbytes 8-bit weight: int8 rows, each row's absmax in `SCB`."""
    return (
        type(weight).__name__ == "Int8Params"
        and weight.dtype == torch.int8
        and getattr(weight, "SCB", None) is not None
    )


def is_quantised(weight: torch.Tensor) -> bool:
    return is_4bit(weight) or is_8bit(weight)


def usable(weight: torch.Tensor) -> bool:
    """A weight `dense` can hand to a matmul: floating point, or quantised 4-bit or 8-bit (not a bitsandbytes
    parameter that was never quantised)."""
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        return is_quantised(weight)
    return weight.is_floating_point()


def dense_bytes(weight: torch.Tensor) -> int:
    """The bytes of a quantised weight's dequantised form, 16-bit (0 for any other weight)."""
    if is_8bit(weight):
        return weight.numel() * 2
    if not is_4bit(weight):
        return 0
    state = weight.quant_state  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    return state.shape.numel() * state.dtype.itemsize


@dataclass
class _Entry:
    weight: weakref.ref
    values: torch.Tensor


@dataclass
class _RecentWeights:
    """Dequantised weights, least recently used first, evicted beyond `capacity` bytes (the newest always stays)."""

    capacity: int = 0
    entries: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)
    held: int = 0
    made: int = 0  # dequantisations since `keep_recent`

    def take(self, weight: torch.Tensor) -> torch.Tensor | None:
        """`weight`'s dequantised values, or None."""
        entry = self.entries.get(id(weight))
        if entry is None or entry.weight() is not weight:
            return None
        self.entries.move_to_end(id(weight))
        return entry.values

    def dequantise(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`weight` dequantised into `dtype` on the current stream, its stale entry and then the oldest ones evicted
        to make room first."""
        self.evict(id(weight))
        nbytes = dense_bytes(weight)
        while self.entries and self.held + nbytes > self.capacity:
            self.evict(next(iter(self.entries)))
        values = _dequantize(weight, torch.empty(_dense_shape(weight), dtype=dtype, device=weight.device))
        self.entries[id(weight)] = _Entry(weakref.ref(weight), values)
        self.held += nbytes
        self.made += 1
        return values

    def evict(self, key: int) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.held -= entry.values.numel() * entry.values.element_size()

    def clear(self) -> None:
        self.entries.clear()
        self.held = self.made = 0


_RECENT: dict[tuple[torch.device, torch.dtype], _RecentWeights] = {}
_CAPACITY = 0


def keep_recent(nbytes: int) -> None:
    """Keep up to `nbytes` of recently dequantised weights per device and dtype (0: only the last one);
    the registry sets one decoder layer's 4-bit weights. Drops what is cached."""
    global _CAPACITY
    _CAPACITY = nbytes
    for recent in _RECENT.values():
        recent.clear()
        recent.capacity = nbytes


def dequantisations() -> int:
    """The quantised weights dequantised on every device and dtype since `keep_recent` (the benches report them)."""
    return sum(recent.made for recent in _RECENT.values())


def _by_triton(weight: torch.Tensor) -> bool:
    """The Triton kernel serves CUDA, and CPU tensors under Triton's interpreter (the kernel tests);
    otherwise bitsandbytes' CPU backend dequantises."""
    from ftw_kernels.dequant import supported

    on_triton = weight.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_triton and supported(weight)


def _dense_shape(weight: torch.Tensor) -> torch.Size:
    return weight.shape if is_8bit(weight) else weight.quant_state.shape  # type: ignore[attr-defined]


def _dequantize(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if is_8bit(weight):  # bitsandbytes' int8 · absmax / 127, in fp32, rounded once into `out`
        scale = weight.SCB.float().mul(1 / 127).unsqueeze(1)  # type: ignore[attr-defined]  # an Int8Params
        return torch.mul(weight.data, scale, out=out)
    from ftw_kernels.dequant import dequantize_4bit

    return dequantize_4bit(weight, out)


def dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype` for a matmul. A quantised weight comes from the cache of recent ones: valid until
    `keep_recent`'s bound evicts it, so use it at once and never save it."""
    if not is_quantised(weight):
        return weight.to(dtype)
    if is_4bit(weight) and not _by_triton(weight):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight, weight.quant_state).to(dtype)  # type: ignore[attr-defined]
    # a 4-bit weight dequantises into its storage dtype, an 8-bit one into the matmul's
    held = weight.quant_state.dtype if is_4bit(weight) else dtype  # type: ignore[attr-defined]
    recent = _RECENT.setdefault((weight.device, held), _RecentWeights(_CAPACITY))
    values = recent.take(weight)
    if values is None:
        values = recent.dequantise(weight, held)
    return values.to(dtype)

"""Frozen bitsandbytes 4-bit base weights (QLoRA) for the fused LoRA functions of kernels/ftw_kernels/lora.py.

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


def usable(weight: torch.Tensor) -> bool:
    """A weight `dense` can hand to a matmul: floating point, or quantised 4-bit (not 8-bit ints,
    nor a `Params4bit` that was never quantised)."""
    if type(weight).__name__ == "Params4bit":
        return is_4bit(weight)
    return weight.is_floating_point()


def dense_bytes(weight: torch.Tensor) -> int:
    """The bytes of a 4-bit weight's dequantised form (0 for any other weight)."""
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

    def dequantise(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` dequantised on the current stream, its stale entry and then the oldest ones evicted to make
        room first."""
        self.evict(id(weight))
        nbytes = dense_bytes(weight)
        while self.entries and self.held + nbytes > self.capacity:
            self.evict(next(iter(self.entries)))
        values = _dequantize(weight, _empty_like_dense(weight))
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
    """The 4-bit weights dequantised on every device and dtype since `keep_recent` (the benches report them)."""
    return sum(recent.made for recent in _RECENT.values())


def _by_triton(weight: torch.Tensor) -> bool:
    """The Triton kernel serves CUDA, and CPU tensors under Triton's interpreter (the kernel tests);
    otherwise bitsandbytes' CPU backend dequantises."""
    from ftw_kernels.dequant import supported

    on_triton = weight.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_triton and supported(weight)


def _empty_like_dense(weight: torch.Tensor) -> torch.Tensor:
    state = weight.quant_state  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    return torch.empty(state.shape, dtype=state.dtype, device=weight.device)


def _dequantize(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    from ftw_kernels.dequant import dequantize_4bit

    return dequantize_4bit(weight, out)


def dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype` for a matmul. A 4-bit weight comes from the cache of recent ones: valid until
    `keep_recent`'s bound evicts it, so use it at once and never save it."""
    if not is_4bit(weight):
        return weight.to(dtype)
    state = weight.quant_state  # type: ignore[attr-defined]  # a bitsandbytes Params4bit
    if not _by_triton(weight):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight, state).to(dtype)
    recent = _RECENT.setdefault((weight.device, state.dtype), _RecentWeights(_CAPACITY))
    values = recent.take(weight)
    if values is None:
        values = recent.dequantise(weight)
    return values.to(dtype)

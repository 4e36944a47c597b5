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

Dequantising ahead (`FTW_DEQUANT_AHEAD=1`, off until measured on a GPU: bench/qlora.py's arm `ftw-ahead`): a
step wants its weights in the same order every time, so the cache learns which weight was wanted after each,
and when it is asked for one, it also dequantises the next on a side stream unless it holds it already. That
stream waits for everything queued before, and the matmuls' stream waits for its event before the first use (or
before the buffer is evicted unused), so the dequantisation of the next weight overlaps the current matmul
instead of sitting between two. It holds one weight beyond the cache's bound.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, fields

import torch

from ftw_kernels.precision import in_backward


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


AHEAD_ENV = "FTW_DEQUANT_AHEAD"  # "1": dequantise the weight a step wants next on a side stream (off by default)


def ahead_wanted() -> bool:
    return os.environ.get(AHEAD_ENV, "0") == "1"


@dataclass
class Counts:
    """Dequantisations since `keep_recent`: on the matmuls' stream when a weight was wanted, ahead of time on the
    side stream, and ahead of time for nothing (evicted before any matmul used it)."""

    inline: int = 0
    ahead: int = 0
    unused: int = 0


@dataclass
class _Entry:
    weight: weakref.ref
    values: torch.Tensor
    ready: torch.cuda.Event | None = None  # the side stream's dequantisation, until a stream has waited for it
    unused: bool = False  # dequantised ahead, not yet wanted


@dataclass
class _RecentWeights:
    """Dequantised weights, least recently used first, evicted beyond `capacity` bytes (the newest always stays),
    and one more weight beyond it dequantised ahead; with the order in which a step wants its weights, to know
    which one comes next."""

    capacity: int = 0
    entries: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)
    held: int = 0
    after: dict[tuple, weakref.ref] = field(default_factory=dict)  # a wanted weight's key → the one wanted after it
    last: tuple | None = None
    counts: Counts = field(default_factory=Counts)

    def take(self, weight: torch.Tensor) -> torch.Tensor | None:
        """`weight`'s dequantised values, ready for the current stream, or None."""
        entry = self.entries.get(id(weight))
        if entry is None or entry.weight() is not weight:
            return None
        self.entries.move_to_end(id(weight))
        entry.unused = False
        _wait(entry)
        return entry.values

    def dequantise(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` dequantised on the current stream, the oldest entries evicted to make room first."""
        self.make_room(weight, self.capacity)
        values = _empty_like_dense(weight)
        self.put(weight, _dequantize(weight, values))
        self.counts.inline += 1
        return values

    def next_after(self, weight: torch.Tensor, backward: bool) -> torch.Tensor | None:
        """Records that the step wanted `weight` and returns the weight it wanted after it the last time, if that
        is still alive: the order of every request, found in the cache or not, which does not change with what
        the cache holds. The key tells the passes apart: the forward, a checkpointed layer's recomputed forward
        (a forward matmul inside autograd's backward), the backward (`backward`: the matmul is dy·W)."""
        key = (in_backward(), backward, id(weight))
        if self.last is not None:
            self.after[self.last] = weakref.ref(weight)
        self.last = key
        found = self.after.get(key)
        return None if found is None else found()

    def dequantise_ahead(self, weight: torch.Tensor) -> None:
        """`weight` dequantised on the device's side stream, after everything queued so far, into a buffer that
        stays beyond `capacity` until wanted: the matmul queued next overlaps it."""
        if id(weight) in self.entries or weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return
        self.make_room(weight, self.capacity + dense_bytes(weight))
        values, ready = _empty_like_dense(weight), None
        if values.is_cuda:
            side = _side_stream(values.device)
            side.wait_stream(torch.cuda.current_stream(values.device))  # the buffer's memory is free from here on
            with torch.cuda.stream(side):
                _dequantize(weight, values)
            ready = torch.cuda.Event()
            ready.record(side)
        else:
            _dequantize(weight, values)
        self.put(weight, values, ready, unused=True)
        self.counts.ahead += 1

    def make_room(self, weight: torch.Tensor, limit: int) -> None:
        """Evict `weight`'s stale entry, then the oldest ones until its bytes fit under `limit` (all if never)."""
        self.evict(id(weight))
        nbytes = dense_bytes(weight)
        while self.entries and self.held + nbytes > limit:
            self.evict(next(iter(self.entries)))

    def put(self, weight: torch.Tensor, values: torch.Tensor, ready=None, unused: bool = False) -> None:
        self.entries[id(weight)] = _Entry(weakref.ref(weight), values, ready, unused)
        self.held += values.numel() * values.element_size()

    def evict(self, key: int) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            _wait(entry)  # its memory goes back to the current stream: only after the side stream wrote it
            self.counts.unused += entry.unused
            self.held -= entry.values.numel() * entry.values.element_size()

    def clear(self) -> None:
        while self.entries:
            self.evict(next(iter(self.entries)))
        self.after.clear()
        self.last = None
        self.counts = Counts()


def _wait(entry: _Entry) -> None:
    """The current stream waits for `entry`'s dequantisation on the side stream, once."""
    if entry.ready is not None:
        torch.cuda.current_stream(entry.values.device).wait_event(entry.ready)
        entry.ready = None


_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


_RECENT: dict[tuple[torch.device, torch.dtype], _RecentWeights] = {}
_CAPACITY = 0
_AHEAD = False  # `FTW_DEQUANT_AHEAD`, as `keep_recent` read it


def keep_recent(nbytes: int) -> None:
    """Keep up to `nbytes` of recently dequantised weights per device and dtype (0: only the last one);
    the registry sets one decoder layer's 4-bit weights. Drops what is cached and the order learnt, and reads
    `FTW_DEQUANT_AHEAD` once for every `dense` after it."""
    global _CAPACITY, _AHEAD
    _CAPACITY, _AHEAD = nbytes, ahead_wanted()
    for recent in _RECENT.values():
        recent.clear()
        recent.capacity = nbytes


def counts() -> Counts:
    """The dequantisations of every device and dtype since `keep_recent`."""
    every = [recent.counts for recent in _RECENT.values()]
    return Counts(*(sum(getattr(c, f.name) for c in every) for f in fields(Counts)))


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


def dense(weight: torch.Tensor, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
    """`weight` in `dtype` for a matmul (`backward`: the backward's dy·W). A 4-bit weight comes from the cache of
    recent ones: valid until `keep_recent`'s bound evicts it, so use it at once and never save it. With
    `FTW_DEQUANT_AHEAD=1`, the weight the step wanted after this one last time is also dequantised now, on a side
    stream, unless the cache has it."""
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
    if _AHEAD:
        following = recent.next_after(weight, backward)
        if following is not None:
            recent.dequantise_ahead(following)
    return values.to(dtype)

"""Adapter weights in the compute dtype, cast once per change instead of at every use.

PEFT keeps LoRA A/B in fp32; the fused LoRA ops multiply in bf16. Casting each A and B at every
forward and backward costs hundreds of tiny kernels per step. `stacked` instead hands out views
of one buffer per group of weights (a group may ask for its weights times a scale: LoRA's s·B, so that no
matmul of the fused ops has to scale), copied from the parameters again only when one of them may
have changed since the last copy:
- an in-place op on it (its `_version`; a replayed CUDA graph of the optimizer step moves it too,
  worker/train/graphed_update.py), or a new tensor behind it (`data_ptr`);
- any optimizer step (a global step hook): fused AdamW and bitsandbytes write the parameters
  without bumping `_version`.
All stale copies are refreshed together, with one `_foreach_copy_` per device and dtype pair, at
the first use after a change: once per optimizer step in training. A replayed optimizer step
refreshes its own: `RefreshPlan` is the same copies as kernels its CUDA graph holds, marked fresh
after each replay, so the host launches none of them (the refresh sampled 3.4 ms of a ~100 ms 1B
step on a slow host). The weights of a group lie back to back in the buffer, so A_q, A_k, A_v
stacked (one GEMM for the three down-projections) is a view too. The copies are the same casts as
`(s·t).to(dtype)`, only done once: the product in the weight's own dtype, rounded once.

Only plain tensors in a single process take this path. Under torch.distributed (FSDP2 swaps in
unsharded parameters whose storage is all-gathered with the version counter preserved), for
tensor subclasses (DTensor), in inference mode, or with `ENABLED` off, every use casts afresh.
Writes through `.data` outside an optimizer step are not seen: nothing in training does that.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ENABLED = True
"""Read at every call; bench/lora_ops.py turns it off to measure the per-use casts."""

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_generation = 0  # optimizer steps seen since import
_hook = None


class _Copies:
    """Copies of some weights in one flat buffer of the compute dtype, or in the places given for them."""

    def __init__(
        self,
        key: tuple,
        groups: Sequence[Sequence[torch.Tensor]],
        scales: Sequence[float],
        dtype: torch.dtype,
        into: Sequence[torch.Tensor | None],
    ):
        tensors = [t for g in groups for t in g]
        self.scales = [s for g, s in zip(groups, scales) for _ in g]
        me = weakref.ref(self)

        def forget(_, key=key):  # a weight died: drop its entry (not a newer one under the same key)
            entry = me()
            if entry is not None and _CACHE.get(key) is entry:
                del _CACHE[key]

        self.key = key
        self.sources = [weakref.ref(t, forget) for t in tensors]
        own = [t for g, place in zip(groups, into) if place is None for t in g]
        flat = torch.empty(sum(t.numel() for t in own), dtype=dtype, device=tensors[0].device)
        self.views, self.stacks, offset = [], [], 0
        for group, place in zip(groups, into):
            if place is not None:
                self.views.append(place)
                self.stacks.append(place)
                continue
            start = offset
            for t in group:
                self.views.append(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
            self.stacks.append(flat[start:offset].view(-1, group[0].shape[-1]))
        self.stamp: tuple | None = None


_CACHE: dict[tuple, _Copies] = {}


def _stamp(tensors: Sequence[torch.Tensor]) -> tuple:
    return (_generation, *[(t._version, t.data_ptr(), t.shape) for t in tensors])


def _count_step(optimizer, args, kwargs) -> None:
    global _generation
    _generation += 1


def _cacheable(tensors: Sequence[torch.Tensor]) -> bool:
    return (
        ENABLED
        and not torch.is_inference_mode_enabled()
        and all(type(t) in _PLAIN for t in tensors)
        and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    )


def stacked(
    groups: Sequence[Sequence[torch.Tensor]],
    dtype: torch.dtype,
    scales: Sequence[float] | None = None,
    into: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """For each group of 2-D weights with the same number of columns, their rows stacked, times the group's
    scale (1 unless `scales` says), in `dtype` (a single weight: itself, scaled and cast). A single-weight group
    may name the tensor its copy lives in (`into`: the s·B slot of a bordered weight, kernels/ftw_kernels/
    bordered.py). Read-only: the copies are shared until the next change."""
    scales = [1.0] * len(groups) if scales is None else [float(s) for s in scales]
    into = [None] * len(groups) if into is None else list(into)
    tensors = [t for g in groups for t in g]
    if not _cacheable(tensors):
        cast = [[_scaled(t, s).to(dtype) for t in g] for g, s in zip(groups, scales)]
        with torch.no_grad():
            return [
                place.copy_(g[0]) if place is not None else g[0] if len(g) == 1 else torch.cat(g)
                for g, place in zip(cast, into)
            ]
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count_step)
    places = tuple(None if p is None else (p.data_ptr(), p.shape, p.stride()) for p in into)
    key = (dtype, tuple(len(g) for g in groups), tuple(scales), places, *map(id, tensors))
    entry = _CACHE.get(key)
    if entry is None or any(r() is not t or v.shape != t.shape for r, v, t in zip(entry.sources, entry.views, tensors)):
        entry = _CACHE[key] = _Copies(key, groups, scales, dtype, into)
    if entry.stamp != _stamp(tensors):
        _refresh_stale()
    return entry.stacks


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


Batches = dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], list[float]]]


def _add(batches: Batches, entry: _Copies, sources: list[torch.Tensor]) -> None:
    for view, src, scale in zip(entry.views, sources, entry.scales):
        dsts, srcs, scales = batches.setdefault((src.device, src.dtype, view.dtype), ([], [], []))
        dsts.append(view)
        srcs.append(src)
        scales.append(scale)


def _copy(batches: Batches) -> None:
    with torch.no_grad():
        for dsts, srcs, scales in batches.values():
            srcs = list(srcs)
            scaled = [i for i, s in enumerate(scales) if s != 1.0]
            if scaled:  # s·t in the weight's own dtype, rounded once by the copy
                products = torch._foreach_mul([srcs[i] for i in scaled], [scales[i] for i in scaled])
                for i, product in zip(scaled, products):
                    srcs[i] = product
            torch._foreach_copy_(dsts, srcs)


def _refresh_stale() -> None:
    batches: Batches = {}
    for key, entry in list(_CACHE.items()):
        sources = [r() for r in entry.sources]
        if any(s is None or s.shape != v.shape for s, v in zip(sources, entry.views)):
            del _CACHE[key]  # a weight died or changed shape: its next use builds a new entry
            continue
        stamp = _stamp(sources)
        if stamp == entry.stamp:
            continue
        _add(batches, entry, sources)
        entry.stamp = stamp
    _copy(batches)


class RefreshPlan:
    """The refresh of every copy made only of `params`, for a CUDA graph to hold: `run()` inside the capture (after
    the kernels that write the parameters), `mark_fresh()` after each replay. Copies made later, or of other tensors
    too, are not in it and refresh at their next use as before. It keeps the copies' buffers and the parameters
    alive: the graph writes and reads them through their pointers."""

    def __init__(self, params: Sequence[torch.Tensor]):
        ids = {id(p) for p in params}
        self.entries: list[tuple[_Copies, list[torch.Tensor], tuple[int, ...]]] = []
        self.batches: Batches = {}
        for entry in list(_CACHE.values()):
            sources = [r() for r in entry.sources]
            if all(s is not None and id(s) in ids for s in sources):
                self.entries.append((entry, sources, tuple(s.data_ptr() for s in sources)))
                _add(self.batches, entry, sources)

    def __len__(self) -> int:
        """How many weights' copies it refreshes."""
        return sum(len(sources) for _, sources, _ in self.entries)

    def run(self) -> None:
        _copy(self.batches)

    def mark_fresh(self) -> None:
        """The replay just ran `run()`'s kernels: each copy still in use, over the same storage, holds its weights."""
        for entry, sources, pointers in self.entries:
            if _CACHE.get(entry.key) is entry and all(s.data_ptr() == ptr for s, ptr in zip(sources, pointers)):
                entry.stamp = _stamp(sources)

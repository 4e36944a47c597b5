"""Activation offloading: what autograd saves for backward waits in host memory, not GPU memory.

    offloader = ActivationOffloader(torch.device("cuda"))  # once per run: side stream, host buffers
    with offloader.saving():                                # each forward
        loss = model(**batch).loss
    loss.backward()                                         # they come back, each fetched ahead

Switched on by `activation_offloading: true` or `gradient_checkpointing: offload` (worker/train/
trainer.py). With gradient checkpointing (HF's, of either kind: worker/train/model.checkpointing_kwargs) the
only tensors saved outside the checkpointed layers are each layer's input and the loss head's, so those
are what move: Llama-3.1-8B at 4 × 2048 tokens, 32 layer inputs of 64 MiB, 2 GiB off the GPU.

Why not `torch.autograd.graph.save_on_cpu`: its copies run on the compute stream, so each one, out
and back, stalls the kernels queued behind it (nothing is fetched ahead), and it copies every saved
tensor: parameters' views, tiny ones, and a tensor saved by three ops three times. Here:
- Only activations of at least `min_bytes` move: never a parameter, a view or dtype cast of one, a
  tensor subclass or a strided view with holes. A tensor saved by several ops moves once.
- The device→host copy runs on a side stream, queued after the kernels that produce the tensor,
  into pinned buffers reused from forward to forward (`HostPool`); `record_stream` tells the
  allocator the side stream still reads the tensor, so the compute stream never waits for it.
- The last `keep_last` tensors of a forward stay on the GPU: backward needs them first.
- Backward fetches a tensor on the side stream together with the `prefetch` tensors offloaded just
  before it, so layer i-1's input travels while layer i computes its backward; the compute stream
  waits on the copy's event, never on the whole side stream, before it reads.
Copies are the only thing that differs between devices (`StreamCopies` on CUDA, `HostCopies` on
CPU), so the bookkeeping is the same code on both and the CPU tests exercise it.

Like every saved-tensor hook, this relies on saved tensors not being modified in place after they
are saved (autograd refuses that anyway when no hook is installed).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger("ftw.train")


# ---- copies: the only device-specific part ------------------------------------------------------
class Copies(Protocol):
    pin_memory: bool

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None: ...
    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> Any: ...  # returns what `wait` takes
    def wait(self, ready: Any) -> None: ...


class HostCopies:
    """A CPU "device": copies complete at once, so there is nothing to wait for."""

    pin_memory = False

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)

    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)

    def wait(self, ready: None) -> None:
        pass


class StreamCopies:
    """CUDA: every copy goes on one side stream, in both directions. A host buffer is only ever
    read or written by this stream, in the order the copies were issued, which is why the pool may
    hand it out again as soon as it is returned: the next write to it queues behind the last read."""

    pin_memory = True

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(src.device))  # after the kernels producing src
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.stream)  # its memory is not reused before the copy has read it

    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> torch.cuda.Event:
        # dst comes from the compute stream's pool: kernels queued there may still use its block
        self.stream.wait_stream(torch.cuda.current_stream(dst.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        dst.record_stream(self.stream)  # freed before it is read (a graph dropped), it still waits for the copy
        return self.stream.record_event()

    def wait(self, ready: torch.cuda.Event | None) -> None:
        if ready is not None:  # the stream autograd runs this backward op on, not the whole side stream
            torch.cuda.current_stream(self.stream.device).wait_event(ready)


class HostPool:
    """Host buffers by size class (powers of two), kept from one forward to the next: pinning
    memory costs far more than the copy into it. A buffer is at most twice its tensor; per class
    the pool keeps as many as one forward had in use at once."""

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self.free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.held_bytes = 0  # everything this pool ever allocated

    def take(self, nbytes: int) -> torch.Tensor:
        size = 1 << max(nbytes - 1, 0).bit_length()
        if self.free[size]:
            return self.free[size].pop()
        self.held_bytes += size
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory)

    def give(self, buffer: torch.Tensor) -> None:
        self.free[buffer.numel()].append(buffer)


# ---- what autograd keeps for one tensor ---------------------------------------------------------
class _Saved:
    """The GPU tensor until its copy out starts; then the host copy; the GPU tensor again once
    fetched back, for as long as the ops that saved it exist (autograd owns this object)."""

    __slots__ = ("device", "host", "buffer", "ready", "slot", "pool", "__weakref__")

    def __init__(self, tensor: torch.Tensor, pool: HostPool):
        self.device: torch.Tensor | None = tensor
        self.host: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None  # the pool's buffer under `host`
        self.ready: Any = None  # what the compute stream waits on before reading `device`
        self.slot: int | None = None  # position among this forward's offloaded tensors
        self.pool = pool

    def __del__(self) -> None:  # never fetched back (a graph dropped before backward)
        if self.buffer is not None:
            self.pool.give(self.buffer)


@dataclass
class PassStats:
    """One forward's traffic: what went to host memory, what was saved but stayed."""

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    deduplicated: int = 0  # saves of a tensor already offloaded or queued
    kept_tensors: int = 0  # large enough, but among the last `keep_last`


def _dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its memory span exactly, in any dimension order: it then copies
    as one block and comes back with the same strides."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _of_parameter(t: torch.Tensor) -> bool:
    """A view of a parameter, or a dtype cast of one (autocast's weight copies): weights, not activations."""
    if isinstance(t._base, torch.nn.Parameter):
        return True
    fn = t.grad_fn
    return (
        fn is not None
        and fn.name() == "ToCopyBackward0"
        and any(isinstance(getattr(node, "variable", None), torch.nn.Parameter) for node, _ in fn.next_functions)
    )


class _Pass:
    """The pack/unpack hooks of one forward and its backward."""

    def __init__(self, off: ActivationOffloader):
        self.off = off
        self.queued: deque[weakref.ref[_Saved]] = deque()  # still on the GPU, newest last
        self.offloaded: list[weakref.ref[_Saved]] = []  # in the order their copies started
        self.seen: dict[int, tuple[weakref.ref, int, weakref.ref[_Saved]]] = {}  # id(tensor) → (tensor, version, saved)
        self.stats = PassStats()

    def eligible(self, t: torch.Tensor) -> bool:
        return (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and t.device == self.off.device
            and t.numel() * t.element_size() >= self.off.min_bytes
            and not _of_parameter(t)
            and _dense(t)
        )

    def pack(self, t: torch.Tensor) -> torch.Tensor | _Saved:
        # detached: the hook's own reference to a saved output must not loop back to its grad_fn
        if not self.eligible(t):
            return t.detach()
        entry = self.seen.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            saved = entry[2]()
            if saved is not None:
                self.stats.deduplicated += 1
                return saved
        saved = _Saved(t.detach(), self.off.pool)
        self.seen[id(t)] = (weakref.ref(t), t._version, weakref.ref(saved))
        self.queued.append(weakref.ref(saved))
        while len(self.queued) > self.off.keep_last:
            oldest = self.queued.popleft()()
            if oldest is not None:
                self.offload(oldest)
        return saved

    def offload(self, saved: _Saved) -> None:
        t = saved.device
        nbytes = t.numel() * t.element_size()
        saved.buffer = self.off.pool.take(nbytes)
        saved.host = saved.buffer[:nbytes].view(t.dtype).as_strided(t.shape, t.stride())
        self.off.copies.to_host(t, saved.host)
        saved.device, saved.slot = None, len(self.offloaded)
        self.offloaded.append(weakref.ref(saved))
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += nbytes

    def fetch(self, saved: _Saved) -> None:
        host = saved.host
        saved.device = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=self.off.device)
        saved.ready = self.off.copies.to_device(host, saved.device)
        self.off.pool.give(saved.buffer)  # safe at once: see StreamCopies
        saved.host = saved.buffer = None

    def unpack(self, packed: torch.Tensor | _Saved) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.device is None:
            self.fetch(packed)
        # backward runs roughly in reverse: the tensors offloaded just before this one come next
        below = packed.slot if packed.slot is not None else len(self.offloaded)
        for ref in reversed(self.offloaded[max(below - self.off.prefetch, 0) : below]):
            nxt = ref()
            if nxt is not None and nxt.device is None:
                self.fetch(nxt)
        self.off.copies.wait(packed.ready)
        return packed.device


class ActivationOffloader:
    """One per run and device: owns the copies (side stream) and the host buffers; `saving()` is
    the context for one forward. `min_bytes`: smaller tensors stay (a copy's fixed cost outweighs
    what they free); `keep_last`: the last tensors of a forward that stay; `prefetch`: how many
    tensors backward fetches ahead of the one it asks for (one is a whole layer ahead)."""

    def __init__(
        self,
        device: torch.device,
        min_bytes: int = 1 << 14,
        keep_last: int = 3,
        prefetch: int = 1,
        copies: Copies | None = None,
    ):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.min_bytes, self.keep_last, self.prefetch = device, min_bytes, keep_last, prefetch
        self.copies: Copies = copies or (StreamCopies(device) if device.type == "cuda" else HostCopies())
        self.pool = HostPool(self.copies.pin_memory)
        self.last: PassStats | None = None

    @contextlib.contextmanager
    def saving(self) -> Iterator[PassStats]:
        run = _Pass(self)
        with torch.autograd.graph.saved_tensors_hooks(run.pack, run.unpack):
            yield run.stats
        run.stats.kept_tensors = sum(ref() is not None for ref in run.queued)
        if self.last is None:
            log.info(
                "activation offloading: %d tensors (%.1f MiB) of a forward go to host memory, %d stay on the %s",
                run.stats.offloaded_tensors,
                run.stats.offloaded_bytes / 2**20,
                run.stats.kept_tensors,
                self.device.type,
            )
        self.last = run.stats

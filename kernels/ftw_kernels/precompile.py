"""A forward and backward's Triton kernels compiled side by side instead of one after another.

Triton compiles a kernel when it first launches, so a fresh process's first step compiles every kernel it runs in
turn: ~7 s of an H100 host's time to first step for a LoRA job with an empty compile cache, on one core of sixteen.
Here the two halves of that are split:
- `recording()` runs a block (a pass of the model) with Triton's JIT hook set: each kernel the process has not
  compiled yet is recorded (its specialisation: signature, constants, attributes, options) and not launched. Its
  outputs keep whatever their memory held, so the block's results mean nothing: the pass is for its kernels only.
- `compile_side_by_side(recorded, workers)` compiles them in forked processes into Triton's file cache (the volume's,
  worker/job/children.compile_cache_env), which is where the next launch of each kernel, in any process, looks first.
A kernel the pass did not reach, or that failed to compile here, is compiled at its first launch as before.
Nothing here touches the GPU: the workers compile for the target the JIT resolved in the recording process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, NamedTuple

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase


@dataclass(frozen=True)
class Recorded:
    """One kernel's specialisation, as the JIT would have compiled it."""

    fn: Any  # the triton.JITFunction
    device: int
    signature: dict[str, str]
    constants: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]  # its compile options, as Triton serialises them

    @property
    def name(self) -> str:
        return self.fn.fn.__qualname__


@dataclass(frozen=True)
class Compiled:
    """What `compile_side_by_side` did."""

    kernels: int
    cached: int  # of them, found in the cache already (a volume that ran the same kernels before)
    failed: list[str]  # "name: error" of each kernel that did not compile (its first launch compiles it)
    workers: int
    seconds: float


class Outcome(NamedTuple):
    """One kernel's compile: its error, if it failed, and whether the cache held it already."""

    error: str | None
    cached: bool


@contextlib.contextmanager
def recording() -> Iterator[list[Recorded]]:
    """The block's kernel launches recorded instead of compiled and run (see the module's docstring), one record per
    specialisation: the JIT asks again at each launch of a kernel it was told not to compile."""
    recorded: list[Recorded] = []
    seen: set[tuple[int, str]] = set()

    def record(*, fn, compile, **_: Any) -> bool:
        key = (id(fn.jit_function), str(compile["key"]))
        if key not in seen:  # a kernel launched again (each micro-batch, each layer) is parsed once
            seen.add(key)
            data = json.loads(compile["specialization_data"])
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
            recorded.append(
                Recorded(
                    fn.jit_function,
                    compile["device"],
                    compile["signature"],
                    compile["constants"],
                    compile["configs"][0],
                    options,
                )
            )
        return True  # the JIT then neither compiles nor launches it

    with _knob(knobs.runtime, "jit_cache_hook", record):
        yield recorded


@contextlib.contextmanager
def counted() -> Iterator[dict[str, int]]:
    """Triton's compiles in the block, by outcome: {"compiled": n, "from_cache": m} (what a pass after the side by
    side compiles still compiled is what the recording missed)."""
    counts = {"compiled": 0, "from_cache": 0}

    def listen(*, cache_hit: bool, **_: Any) -> None:
        counts["from_cache" if cache_hit else "compiled"] += 1

    with _knob(knobs.compilation, "listener", listen):
        yield counts


@contextlib.contextmanager
def _knob(group: Any, name: str, value: Any) -> Iterator[None]:
    """One of Triton's knobs set for the block."""
    previous = getattr(group, name)
    setattr(group, name, value)
    try:
        yield
    finally:
        setattr(group, name, previous)


_PENDING: list[Recorded] = []  # what the forked workers compile, by index (a JITFunction cannot be pickled)


def compile_one(item: Recorded) -> Outcome:
    """`item` compiled into Triton's file cache as the JIT's own compile would. A failure is left to its first launch,
    which compiles it again and reports the error where it belongs."""
    try:
        _, _, target, backend, _ = item.fn.device_caches[item.device]  # set up in the recording process
        options = backend.parse_options(dict(item.options))
        src = item.fn.ASTSource(item.fn, item.signature, item.constants, item.attrs)
        with counted() as counts:
            triton.compile(src, target=target, options=options.__dict__)
        return Outcome(None, counts["from_cache"] > 0)
    except Exception as e:
        return Outcome(f"{type(e).__name__}: {str(e)[:200]}", False)


def _compile_pending(index: int) -> tuple[int, Outcome]:
    return index, compile_one(_PENDING[index])


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(5)  # the processes beside it (the train stage's model loading) come first


def compile_side_by_side(recorded: list[Recorded], workers: int) -> Compiled:
    """Each recorded kernel compiled into Triton's file cache, `workers` at a time in processes forked from this one
    (which may have initialised CUDA: they make no CUDA call)."""
    started = time.monotonic()
    if not recorded:
        return Compiled(0, 0, [], 0, 0.0)
    workers = max(1, min(workers, len(recorded)))
    _PENDING[:] = recorded
    failed: list[str] = []
    cached = 0
    try:
        with warnings.catch_warnings():  # "fork() of a multi-threaded process": the children only compile
            warnings.simplefilter("ignore", DeprecationWarning)
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_lower_priority
            ) as pool:
                for index, outcome in pool.map(_compile_pending, range(len(recorded))):
                    cached += outcome.cached
                    if outcome.error is not None:
                        failed.append(f"{recorded[index].name}: {outcome.error}")
    except BrokenProcessPool as e:  # a worker killed (out of memory): the rest compile at their first launch
        failed.append(f"the worker processes: {e}")
    finally:
        _PENDING.clear()
    return Compiled(len(recorded), cached, failed, workers, time.monotonic() - started)


class Offline(DriverBase):
    """Triton's JIT pointed at a GPU that is not here: with `recording()`, a pass over CPU tensors records what it
    would compile for `target` (bench/parallel_compile.py and the tests, on machines without a GPU). Nothing can be
    launched through it."""

    def __init__(self, target: GPUTarget):
        super().__init__()
        self.target = target

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("no GPU to time kernels on")

    def get_current_device(self) -> int:
        return -1  # the JIT keys its per-device state by this: apart from any real device's

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def offline(target: GPUTarget) -> Iterator[None]:
    """Triton's JIT on `Offline(target)` for the block."""
    drivers = triton.runtime.driver
    previous = drivers._active  # None where none was made yet (reset_active would make one: none here)
    drivers.set_active(Offline(target))
    try:
        yield
    finally:
        drivers.set_active(previous)


def available_workers(limit: int = 16) -> int:
    """Processes to compile in: the cores this process may use, one left to the rest of the machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores - 1))

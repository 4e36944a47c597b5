"""Launch-grid and block-size arithmetic on the host, in plain Python.

Since Triton 3.5 `triton.cdiv` and `triton.next_power_of_2` are constexpr functions: called from Python each goes
through `ConstexprFunction.__call__` (~2 µs, against ~0.03 µs here). A kernel's host side calls them a few times
a launch, ~2,300 times a step of an 8B model, which a short step (a few thousand tokens, the host setting the
pace; docs/benchmarks.md, "eleventh session") pays in full. Inside `@triton.jit` code `tl.cdiv` stays. The SM count
that sizes some grids is read once a device for the same reason."""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rank_block(r: int) -> int:
    """The block side of a LoRA rank's dots for rank r: a power of two, at least 16 (a tensor-core dot's least
    side)."""
    return max(16, next_power_of_2(r))


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, as triton.next_power_of_2 (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def sm_count(device: torch.device) -> int:
    """The device's SM count (1 off CUDA), read once a device: the lookup is a few µs a call."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count

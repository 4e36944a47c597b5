"""Kernel tests run the Triton kernels on CPU through Triton's interpreter (small shapes), and on
CUDA natively when a GPU is present (tests/kernels/test_gpu.py, through the device tool)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton.jit decorates: before kernels import

pytest.importorskip("triton")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere fails."""
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def rng_seed() -> int:
    """Fresh inputs each run (the seed is in the failure message to replay it)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed

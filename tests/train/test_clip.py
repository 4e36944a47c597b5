"""worker/train/optim.py clip_gradients: torch's clip_grad_norm_ without its per-tensor Python work, so it must give
torch's norm and torch's clipped gradients, bit for bit, and hand any case it does not cover to torch."""

from __future__ import annotations

import math

import pytest
import torch

from worker.train.optim import clip_gradients


def params_with_grads(dtypes: list[torch.dtype], scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, dtype in enumerate(dtypes):
        p = torch.nn.Parameter(torch.zeros(3 + i, 5, dtype=dtype))
        p.grad = (torch.randn(3 + i, 5, generator=g) * scale).to(dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # a parameter with no gradient (unused this step)
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6, math.inf])
@pytest.mark.parametrize(
    "dtypes", [[torch.float32] * 6, [torch.bfloat16] * 4, [torch.float32, torch.bfloat16, torch.float32]]
)
def test_clip_gradients_matches_torch_bit_for_bit(max_norm, dtypes):
    ours, theirs = params_with_grads(dtypes, scale=3.0), params_with_grads(dtypes, scale=3.0)
    norm = clip_gradients(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(norm, expected)
    for a, b in zip(ours, theirs):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    clipped = max_norm < float(expected)
    assert clipped == (max_norm == 0.5)  # the case that clips, and the ones that leave the gradients alone
    if clipped:
        total = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in ours if p.grad is not None]))
        assert float(total) == pytest.approx(max_norm, rel=1e-2)


def test_no_gradients_at_all_is_a_zero_norm():
    assert float(clip_gradients([torch.nn.Parameter(torch.zeros(2))], 1.0)) == 0.0

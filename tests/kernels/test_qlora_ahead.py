"""Dequantising the next 4-bit weight ahead (`FTW_DEQUANT_AHEAD=1`, kernels/ftw_kernels/qlora.py): once the steps
have taught the cache their order (the first step, and the second's first request, which follows the first's
last), every weight a step dequantises was dequantised ahead (none on the matmuls' path, none for nothing, no more
than without), within one weight beyond the cache's bound, and training computes the same numbers: bit for bit on
the CPU; on a GPU (DEVICE is CUDA there), where the same tests run the side stream, within fp32 rounding, as
attention's backward may sum in another order from run to run."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from ftw_kernels import apply_kernels, qlora  # noqa: E402
from tests.kernels.conftest import rel_err  # noqa: E402
from tests.kernels.test_apply_kernels import DEVICE, packed_batch  # noqa: E402
from tests.kernels.test_qlora import qlora_config, tiny_qlora  # noqa: E402

STEPS = 5


def train_counting(model: torch.nn.Module, checkpointing: bool, batch: dict, held: list[int]) -> tuple[list, list]:
    """STEPS steps of SGD on `batch`; each step's losses and grads, and each step's dequantisations."""
    applied = apply_kernels(model, qlora_config(gradient_checkpointing=checkpointing))  # resets the cache, its order
    assert ("dequant_ahead" in applied) == qlora.ahead_wanted()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    results, per_step = [], []
    for _ in range(STEPS):
        before = qlora.counts()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        after = qlora.counts()
        per_step.append(qlora.Counts(*(getattr(after, n) - getattr(before, n) for n in ("inline", "ahead", "unused"))))
        held.append(max(r.held for r in qlora._RECENT.values()))
    return results, per_step


@pytest.mark.parametrize(
    "checkpointing,reentrant",
    [(False, False), (True, True), (True, False)],
    ids=["no-ckpt", "reentrant", "non-reentrant"],
)
def test_once_learnt_every_weight_is_dequantised_ahead(monkeypatch, checkpointing: bool, reentrant: bool) -> None:
    base = tiny_qlora(checkpointing=checkpointing, reentrant=reentrant)
    largest = max(qlora.dense_bytes(p) for p in base.parameters())
    batch = packed_batch()
    monkeypatch.delenv(qlora.AHEAD_ENV, raising=False)
    held_plain: list[int] = []
    plain, plain_counts = train_counting(copy.deepcopy(base), checkpointing, batch, held_plain)
    monkeypatch.setenv(qlora.AHEAD_ENV, "1")
    held_ahead: list[int] = []
    ahead, ahead_counts = train_counting(copy.deepcopy(base), checkpointing, batch, held_ahead)

    assert all(c.ahead == 0 and c.unused == 0 for c in plain_counts)
    assert ahead_counts[0] == plain_counts[0]  # the first step teaches the order
    for plain_step, ahead_step in zip(plain_counts[2:], ahead_counts[2:]):
        assert (ahead_step.inline, ahead_step.unused) == (0, 0)
        assert 0 < ahead_step.ahead <= plain_step.inline  # the weight held beyond the bound can save one
    assert max(held_ahead) <= qlora._CAPACITY + largest
    same = torch.equal if DEVICE == "cpu" else lambda x, y: rel_err(x, y) < 1e-5
    for (loss, grads), (ref_loss, ref_grads) in zip(ahead, plain):
        assert same(loss, ref_loss)
        assert len(grads) == len(ref_grads) == 2 * 7 * 2 and all(map(same, grads, ref_grads))

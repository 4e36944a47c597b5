"""The law of LoRA's dropout mask (kernels/ftw_kernels/lora_dropout.py), which every kernel that drops shares and a
resumed run and a checkpointed recompute rely on: Philox's draws of (seed, row, column), 16 bits an element, kept
where they reach p·2¹⁶, scaled by 1/(1 − p); drawn from torch's seed, nothing in eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftw_kernels.lora_dropout import Dropout, blocking, draw, dropped
from tests.kernels.test_apply_kernels import DEVICE


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_the_mask_keeps_one_minus_p_and_scales_what_it_keeps(p, rng_seed):
    x = torch.randn(64, 2500, device=DEVICE, dtype=torch.bfloat16)
    y = dropped(x, Dropout(p, 1234))
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(y[kept].float(), x[kept].float() / (1 - p), rtol=8e-3, atol=0)
    # every column block and row draws numbers of its own: no stripe of the tensor repeats another's mask
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[:, :1024], kept[:, 1024:2048])


def test_the_mask_is_a_function_of_the_seed_and_the_element():
    x = torch.randn(33, 1500, device=DEVICE)
    d = Dropout(0.2, 77)
    y = dropped(x, d)
    assert torch.equal(dropped(x, d), y)
    assert not torch.equal(dropped(x, Dropout(0.2, 78)), y)
    wide = torch.randn(33, 1512, device=DEVICE)
    wide[:, :1500] = x
    assert torch.equal(dropped(wide[:, :1500], d), y)  # a norm's output with room beside its rows
    same = x.clone()
    dropped(same, d, out=same)
    assert torch.equal(same, y)


def philox(seed: int, counters: np.ndarray) -> list[np.ndarray]:
    """Philox4x32-10 of 64-bit counters (low word, high word, 0, 0) under key (seed, 0): Random123's
    generator, which Triton's `randint4x` implements, written out in numpy."""
    m32 = np.uint64(0xFFFFFFFF)
    c = [counters & m32, counters >> np.uint64(32), np.zeros_like(counters), np.zeros_like(counters)]
    k0, k1 = np.uint64(seed) & m32, np.uint64(seed) >> np.uint64(32)
    for _ in range(10):
        hi_b, hi_a = (np.uint64(0xCD9E8D57) * c[2]), (np.uint64(0xD2511F53) * c[0])
        c = [(hi_b >> np.uint64(32)) ^ c[1] ^ k0, hi_b & m32, (hi_a >> np.uint64(32)) ^ c[3] ^ k1, hi_a & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c


def reference_keep(rows: int, cols: int, dropout: Dropout) -> torch.Tensor:
    """The mask's law, written out: element (row, column) of a rows × cols tensor lies in column block
    column // block (the width fixes the block) and in one of its eight lanes; its counter names (row, column
    block, column mod block / 8) and the lane picks 16 bits of one of the counter's four words."""
    block = blocking(rows, cols)[2]
    eighth = np.uint64(block // 8)
    row = np.arange(rows, dtype=np.uint64)[:, None]
    col = np.arange(cols, dtype=np.uint64)[None, :]
    within = col % np.uint64(block)
    counters = (row * np.uint64(-(-cols // block)) + col // np.uint64(block)) * eighth + within % eighth
    words = philox(dropout.seed, counters)
    lane = (within // eighth).astype(np.int64)
    word = np.choose(np.broadcast_to(lane % 4, counters.shape), words)
    draws = np.where(lane < 4, word & np.uint64(0xFFFF), word >> np.uint64(16))
    return torch.from_numpy(draws >= dropout.threshold)


@pytest.mark.parametrize("rows, cols", [(5, 2500), (9, 1024), (11, 100)])
def test_the_mask_is_philox_over_each_elements_row_and_column(rows, cols):
    """The law the kernels share (a resumed run and a checkpointed recompute rely on it): Philox's draws of
    (seed, row, column), 16 bits an element, kept where they reach p·2¹⁶."""
    d = Dropout(0.3, 2**31 - 5)
    got = dropped(torch.ones(rows, cols, device=DEVICE), d).cpu()
    assert torch.equal(got != 0, reference_keep(rows, cols, d))
    assert torch.all(got[got != 0] == torch.tensor(d.scale, dtype=torch.float32))
    assert d.threshold == round(0.3 * 2**16) and abs(d.scale - 1 / 0.7) < 1e-4


def test_the_threshold_keeps_some_and_drops_some():
    assert Dropout(1e-9, 1).threshold == 1 and Dropout(1 - 1e-9, 1).threshold == 2**16 - 1


def test_draw_follows_torch_seed_and_eval_draws_nothing():
    torch.manual_seed(5)
    first = draw(0.1)
    torch.manual_seed(5)
    assert draw(0.1) == first and draw(0.0) is None

"""Which attention kernel a batch's rows take (kernels/ftw_kernels/attention.py): whole rows (every row one
sample, no padding) may run cuDNN's fused attention; packed rows and padded ones need the varlen kernel's
segments. Decided from the host's segments, so the choice costs no device sync."""

from __future__ import annotations

import torch

from ftw_kernels.attention import host_segments, whole_rows


def decide(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bool:
    segments = host_segments(position_ids, attention_mask)
    batch, seq = position_ids.shape
    return whole_rows(segments["cu_seq_lens_q"], segments["max_length_q"], batch, seq)


def test_full_length_rows_are_whole():
    assert decide(torch.arange(16).expand(3, -1))


def test_a_packed_row_or_a_padded_one_is_not():
    packed = torch.cat([torch.arange(10), torch.arange(6)])
    assert not decide(torch.stack([torch.arange(16), packed]))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0  # the second row ends in padding: its own segment
    assert not decide(torch.arange(16).expand(2, -1), mask)
    assert decide(torch.arange(16).expand(2, -1), torch.ones(2, 16, dtype=torch.long))

"""Which attention kernel a batch's rows take (kernels/ftw_kernels/attention.py): segments of one length
(full-length rows, or full-length samples packed into a row) may run cuDNN's fused attention as a batch of
equal rows; samples of different lengths, and padding, need the varlen kernel's segments. Decided from the
host's segments, so the choice costs no device sync."""

from __future__ import annotations

import torch

from ftw_kernels.attention import cudnn_for_equal_segments, equal_segments, host_segments


def segments(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    found = host_segments(position_ids, attention_mask)
    batch, seq = position_ids.shape
    return equal_segments(found["cu_seq_lens_q"], found["max_length_q"], batch, seq)


def test_full_length_rows_are_equal_segments():
    assert segments(torch.arange(16).expand(3, -1)) == 3
    assert segments(torch.arange(16).expand(3, -1), torch.ones(3, 16, dtype=torch.long)) == 3


def test_equal_samples_packed_into_a_row_are_too():
    assert segments(torch.arange(8).repeat(2)[None]) == 2
    assert segments(torch.arange(4).repeat(4).expand(2, -1)) == 8


def test_samples_of_different_lengths_or_padding_are_not():
    packed = torch.cat([torch.arange(10), torch.arange(6)])
    assert segments(torch.stack([torch.arange(16), packed])) == 0
    assert segments(torch.cat([torch.arange(4), torch.arange(4), torch.arange(8)])[None]) == 0
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0  # the second row ends in padding: its own segment
    assert segments(torch.arange(16).expand(2, -1), mask) == 0


def test_ftw_cudnn_attention_0_keeps_the_flash_kernel(monkeypatch):
    monkeypatch.delenv("FTW_CUDNN_ATTENTION", raising=False)
    assert cudnn_for_equal_segments()
    monkeypatch.setenv("FTW_CUDNN_ATTENTION", "0")
    assert not cudnn_for_equal_segments()

"""The speed estimate of an unpacked run: with the kernels, the trainer joins each micro-batch's samples into one
row (worker/train/batches.padding_free), so the GPU computes the real tokens only; without them, or with
pad_to_sequence_len, the rows are padded to the longest and the padding costs as much as a token."""

from __future__ import annotations

import pytest

from tests.estimate.test_trained_share import workload
from worker.estimate.model import gpu_seconds, tokens_per_s


def test_an_unpacked_run_with_the_kernels_computes_its_real_tokens_only():
    w, _ = workload(None, use_kernels=True, sample_packing=False)
    assert w.padding_free and w.compute_tokens == w.real_tokens
    padded, _ = workload(None, use_kernels=True, sample_packing=False, pad_to_sequence_len=True)
    assert not padded.padding_free and padded.compute_tokens > padded.real_tokens
    # lognormal lengths: the longest of 4 rows is far past the mean, so the padded rows' GPU time is far longer; the
    # steps' tokens/s differ less, since the host's launches bound a short padding-free step (measured at 8B: 1.14×)
    assert gpu_seconds(padded) > 1.3 * gpu_seconds(w)
    assert tokens_per_s(w) > 1.1 * tokens_per_s(padded)


@pytest.mark.parametrize(
    "config",
    [
        {"use_kernels": False},
        {"pad_to_sequence_len": True},
        {"attn_implementation": "eager"},
        {
            "rl": "grpo",
            "datasets": [{"path": "org/prompts", "type": "prompt_answer"}],
            "trl": {"reward_funcs": ["exact_match"]},
        },
    ],
)
def test_padded_rows_where_the_trainer_keeps_them(config):
    w, _ = workload(None, sample_packing=False, **{"use_kernels": True, **config})
    assert not w.padding_free and w.compute_tokens > w.real_tokens

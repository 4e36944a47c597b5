"""`ftw train` with lora_dropout on the fused LoRA kernels (on the CPU through Triton's interpreter): the masks are
drawn from torch's CPU generator, whose state every checkpoint saves, so a run resumed from its checkpoint ends on
the uninterrupted run's adapter (tests/kernels/test_lora_dropout.py checks the masks themselves)."""

from __future__ import annotations

import json

import pytest

from tests.train.helpers import (
    base_config,
    pack,
    resumed_matches_uninterrupted,
    write_cache,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_fused_lora_dropout_resumes_to_the_same_adapter(task_model_dir, task_rows, tmp_path):
    rows, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", pack(rows[:48], 64), packed=True, sequence_len=64)
    cfg = base_config(
        task_model_dir,
        use_kernels=True,
        lora_dropout=0.1,
        micro_batch_size=1,
        max_steps=3,
        save_steps=1,
        learning_rate=3e-3,
        bf16=False,
        tf32=False,
    )
    resumed_matches_uninterrupted(cfg, cache, tmp_path, step=1)
    kernels = json.loads((tmp_path / "reference" / "summary.json").read_text())["kernels"]
    assert {"lora_qkv", "lora_o", "lora_mlp"} <= set(kernels)  # dropout keeps the fused LoRA

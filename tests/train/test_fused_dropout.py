"""`ftw train` with lora_dropout on the fused LoRA kernels (on the CPU through Triton's interpreter): the masks are
drawn from torch's CPU generator, whose state every checkpoint saves, so a run resumed from its checkpoint ends on
the uninterrupted run's adapter (tests/kernels/test_dropout_mask.py checks the masks themselves)."""

from __future__ import annotations

import json

import pytest

from tests.train.helpers import resumed_packed_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_fused_lora_dropout_resumes_to_the_same_adapter(task_model_dir, task_rows, tmp_path):
    rows, _, _ = task_rows
    config = {"use_kernels": True, "lora_dropout": 0.1, "bf16": False, "tf32": False}
    resumed_packed_run(task_model_dir, rows, tmp_path, step=1, n_rows=48, **config)
    kernels = json.loads((tmp_path / "reference" / "summary.json").read_text())["kernels"]
    assert {"lora_qkv", "lora_o", "lora_mlp"} <= set(kernels)  # dropout keeps the fused LoRA

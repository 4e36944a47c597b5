"""`tf32` lets fp32 matmuls run in TF32 on the GPU, which would round the rotary angles of transformers' forward
(tests/kernels/test_rope_angles.py): the train stage turns TF32 on before it builds the model, whose rotary module
then computes exact angles, as the run's summary says. The CPU resolves `tf32` to off, so the test resolves it as
an Ampere GPU would."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import base_config, run_inprocess
from worker.train import trainer
from worker.train.model import Precision


@pytest.mark.parametrize("tf32", [True, False])
def test_the_run_computes_exact_rotary_angles_where_tf32_is_on(
    tf32, task_model_dir, small_cache, tmp_path, monkeypatch
):
    monkeypatch.setattr(trainer, "resolve_precision", lambda cfg, device: Precision(torch.float32, None, tf32))
    cfg = base_config(task_model_dir, max_steps=1, save_strategy="no", bf16=False)
    assert run_inprocess(cfg, tmp_path, small_cache) == 0
    kernels = json.loads((tmp_path / "summary.json").read_text())["kernels"]
    assert ("rope_angles" in kernels) is tf32
    assert torch.get_float32_matmul_precision() == "highest"  # the process's later tests keep exact fp32 matmuls

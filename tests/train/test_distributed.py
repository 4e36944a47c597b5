"""Two processes on CPU (gloo) under torchrun: DDP and FSDP2 give the adapter one process gives
with the same global batch. (DeepSpeed ZeRO: test_deepspeed.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import adapter_tensors, base_config, run_inprocess, run_train, write_cache

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def reference(task_model_dir, task_rows, tmp_path_factory):
    """One process, micro-batch 2 × gradient accumulation 2 = a global batch of 4 rows."""
    train, held, _ = task_rows
    root = tmp_path_factory.mktemp("dist")
    cache = write_cache(root / "cache", train[:32], held[:8])
    cfg = base_config(
        task_model_dir, micro_batch_size=2, gradient_accumulation_steps=2, max_steps=4, save_strategy="no", eval_steps=2
    )
    assert run_inprocess(cfg, root / "single", cache) == 0
    return cfg, cache, root


@pytest.mark.parametrize(
    "sharding", [{}, {"fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}], ids=["ddp", "fsdp2"]
)
def test_two_processes_match_one(reference, sharding):
    cfg, cache, root = reference
    name = next(iter(sharding), "ddp")
    two = {**cfg, "gradient_accumulation_steps": 1, **sharding}  # 2 ranks × micro-batch 2 = the same 4 rows per step
    proc = run_train(two, root / name, cache, nproc=2, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((root / name / "summary.json").read_text())
    single = json.loads((root / "single" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == ("ddp" if name == "ddp" else "fsdp2")
    assert [loss for _, loss in summary["loss_curve"]] == pytest.approx(
        [loss for _, loss in single["loss_curve"]], rel=1e-5
    )
    assert summary["eval_curve"][-1][1] == pytest.approx(single["eval_curve"][-1][1], rel=1e-5)
    ours, ref = adapter_tensors(root / name / "adapter"), adapter_tensors(root / "single" / "adapter")
    assert set(ours) == set(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)

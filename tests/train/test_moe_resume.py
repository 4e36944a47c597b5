"""A tiny Qwen3-MoE with LoRA on its experts resumes from a checkpoint to the same adapter (and the
same router aux loss) as an uninterrupted run."""

from __future__ import annotations

import pytest

from tests.train.helpers import resumed_packed_run, successor_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_expert_lora_resumes_to_the_same_adapter(task_rows, tmp_path):
    from worker.devtools.tiny import build_model

    train, _ = successor_task()
    model = build_model(
        tmp_path / "moe",
        style="chatml",
        extra_text=[p + a for p, a in train[:200]],
        arch="qwen3_moe",
        hidden=64,
        heads=2,
        kv_heads=1,
        intermediate=128,
        experts=4,
    )
    rows, _, _ = task_rows
    reference = resumed_packed_run(
        model,
        rows,
        tmp_path,
        step=3,
        lora_target_linear=None,
        lora_target_modules=["q_proj", "v_proj"],
        lora_target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        output_router_logits=True,
        gradient_accumulation_steps=2,
    )
    assert any("experts" in k for k in reference)

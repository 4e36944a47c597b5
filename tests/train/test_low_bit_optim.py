"""torchao's low-bit AdamW (`adamw_torch_8bit` / `adamw_torch_4bit`, axolotl's `ao_adamw_*`): it keeps
its states in 8 or 4 bits, trains, and a run resumed from its checkpoint ends on the same adapter as an
uninterrupted one (the quantised states go through the checkpoint and come back)."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import resumed_packed_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_low_bit_adamw_keeps_quantised_states_and_resumes_to_the_same_adapter(task_model_dir, task_rows, tmp_path):
    rows, _, _ = task_rows
    # rank 64: the adapters' matrices have ≥ 4,096 entries, the size from which torchao quantises a state
    reference = resumed_packed_run(
        task_model_dir, rows, tmp_path, step=3, optimizer="adamw_torch_8bit", lora_r=64, lora_alpha=64
    )
    assert any(v.abs().sum() > 0 for k, v in reference.items() if "lora_B" in k)  # it trained: B starts at zero
    saved = tmp_path / "reference" / "checkpoints" / "checkpoint-3" / "optimizer.pt"
    states = torch.load(saved, map_location="cpu", weights_only=False)["state"]
    kinds = {type(s["exp_avg"]).__name__ for s in states.values()}
    assert "OptimState8bit" in kinds, kinds  # 8-bit states, saved as such and resumed from

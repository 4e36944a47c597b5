"""A low-bit optimizer in the estimate: its moments count the bits it keeps them in, so the checks' memory
verdict does not refuse a full fine-tune that fits only because of 8-bit or 4-bit AdamW states."""

from __future__ import annotations

import pytest

from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.model import memory_parts
from worker.estimate.report import workload_of
from worker.estimate.shapes import known_shape

MODEL = "meta-llama/Llama-3.1-8B"


def state(optimizer: str, **config) -> int:
    shape = known_shape(MODEL)
    assert shape is not None
    cfg = TrainingConfig.model_validate({"base_model": MODEL, "learning_rate": 1e-4, "optimizer": optimizer, **config})
    return memory_parts(workload_of(cfg, shape, DatasetSize()))["trainable_state"]


@pytest.mark.parametrize(
    "optimizer, bytes_a_param",
    [
        ("adamw_torch_fused", 6),  # bf16 grad + two bf16 moments
        ("paged_adamw_32bit", 6),  # the parameter's own precision
        ("adamw_bnb_8bit", 4),  # two 8-bit moments
        ("adamw_torch_8bit", 4),
        ("adamw_torch_4bit", 3),  # two 4-bit moments
    ],
)
def test_full_fine_tuning_counts_the_moments_in_the_optimizers_bits(optimizer, bytes_a_param):
    shape = known_shape(MODEL)
    assert shape is not None
    assert state(optimizer) == int(shape.params * bytes_a_param)


def test_an_adapter_keeps_its_fp32_master_and_grad_whatever_the_optimizer():
    lora = {"adapter": "lora", "lora_r": 16, "lora_target_linear": True}
    full_precision, eight_bit = state("adamw_torch", **lora), state("adamw_torch_8bit", **lora)
    assert full_precision / eight_bit == pytest.approx(18 / 12, rel=1e-6)  # 4 + 4 + 2·4 + 2 against 4 + 4 + 2·1 + 2

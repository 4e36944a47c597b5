"""Settings that measured slower than leaving them out at a shape are named, in `ftw estimate`'s notes and the checks
stage's warnings (tests/checks/test_stage.py): today float8 matmuls over a 4-bit base at hidden ≤ 2048."""

from __future__ import annotations

from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.model import slower_settings
from worker.estimate.report import estimate, workload_of
from worker.estimate.shapes import known_shape


def notes_for(model: str, **config) -> list[str]:
    shape = known_shape(model)
    assert shape is not None
    cfg = TrainingConfig.model_validate({"base_model": model, "learning_rate": 1e-4, "lora_r": 16, **config})
    return slower_settings(workload_of(cfg, shape, DatasetSize()))


QLORA = {"adapter": "qlora", "load_in_4bit": True}


def test_fp8_over_4bit_is_named_at_1b_only():
    small = notes_for("meta-llama/Llama-3.2-1B", **QLORA, fp8_base_weights=True)
    assert len(small) == 1 and "hidden size is 2048" in small[0] and "leave fp8_base_weights out" in small[0]
    assert notes_for("meta-llama/Llama-3.1-8B", **QLORA, fp8_base_weights=True) == []
    assert notes_for("meta-llama/Llama-3.2-1B", **QLORA) == []
    assert notes_for("meta-llama/Llama-3.2-1B", adapter="lora", fp8_base_weights=True) == []  # a bf16 base: 1.19×


def test_the_estimate_carries_the_note():
    cfg = TrainingConfig.model_validate(
        {"base_model": "meta-llama/Llama-3.2-1B", "learning_rate": 1e-4, **QLORA, "fp8_base_weights": True}
    )
    shape = known_shape("meta-llama/Llama-3.2-1B")
    assert any("leave fp8_base_weights out" in n for n in estimate(cfg, {}, "NVIDIA H200", shape, 10**6).notes)

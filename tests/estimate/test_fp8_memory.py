"""`fp8_base_weights` in the estimate: the decoder layers' Linears count one byte a weight, the rest stays bf16, so
the checks' memory verdict (worker/checks) does not refuse a run that fits only because of it."""

from __future__ import annotations

from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.model import memory_parts
from worker.estimate.report import workload_of
from worker.estimate.shapes import known_shape


def test_fp8_base_weights_halve_the_linear_weights_only():
    shape = known_shape("meta-llama/Llama-3.1-8B")
    assert shape is not None
    base = {"base_model": "meta-llama/Llama-3.1-8B", "learning_rate": 1e-4, "adapter": "lora"}
    bf16, fp8 = (
        memory_parts(workload_of(TrainingConfig.model_validate({**base, "fp8_base_weights": on}), shape, DatasetSize()))
        for on in (False, True)
    )
    assert bf16["weights"] == shape.params * 2
    assert bf16["weights"] - fp8["weights"] == shape.linear_params  # 1 byte saved a Linear weight
    assert {k: v for k, v in bf16.items() if k != "weights"} == {k: v for k, v in fp8.items() if k != "weights"}

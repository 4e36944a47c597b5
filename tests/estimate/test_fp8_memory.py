"""`fp8_base_weights` in the estimate: in training the decoder layers' Linears count one byte a weight (the rest
stays bf16), so the checks' memory verdict (worker/checks) does not refuse a run that fits only because of it; but
the model loads as bf16 before it is converted, so what the GPU must hold to load it stays the bf16 size."""

from __future__ import annotations

from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.model import OVERHEAD_BYTES, Workload, memory_parts, peak_bytes, weight_bytes
from worker.estimate.report import workload_of
from worker.estimate.shapes import known_shape


def test_fp8_base_weights_halve_the_linear_weights_only():
    shape = known_shape("meta-llama/Llama-3.1-8B")
    assert shape is not None
    base = {"base_model": "meta-llama/Llama-3.1-8B", "learning_rate": 1e-4, "adapter": "lora"}
    work: list[Workload] = [
        workload_of(TrainingConfig.model_validate({**base, "fp8_base_weights": on}), shape, DatasetSize())
        for on in (False, True)
    ]
    bf16, fp8 = (memory_parts(w) for w in work)
    assert bf16["weights"] == shape.params * 2
    assert bf16["weights"] - fp8["weights"] == shape.linear_params  # 1 byte saved a Linear weight
    assert {k: v for k, v in bf16.items() if k != "weights"} == {k: v for k, v in fp8.items() if k != "weights"}
    assert weight_bytes(work[1]) == weight_bytes(work[0]) == shape.params * 2  # loading: bf16 either way
    big = [w.replace(micro_batch_size=4, sequence_len=2048) for w in work]  # the step's peak above the load's
    assert peak_bytes(big[1]) == sum(memory_parts(big[1]).values()) < peak_bytes(big[0])
    tiny_batch = work[1].replace(micro_batch_size=1, sequence_len=16)  # the load's peak above the step's
    assert peak_bytes(tiny_batch) == shape.params * 2 + OVERHEAD_BYTES > sum(memory_parts(tiny_batch).values())


def test_a_4bit_base_with_float8_matmuls_loads_and_stays_4bit():
    shape = known_shape("meta-llama/Llama-3.1-8B")
    assert shape is not None
    base = {"base_model": "meta-llama/Llama-3.1-8B", "learning_rate": 1e-4, "adapter": "qlora", "load_in_4bit": True}
    plain, fp8 = (
        workload_of(TrainingConfig.model_validate({**base, "fp8_base_weights": on}), shape, DatasetSize())
        for on in (False, True)
    )
    assert memory_parts(fp8) == memory_parts(plain)  # the float8 copy is transient, one weight at a time
    assert weight_bytes(fp8) == weight_bytes(plain) < shape.params  # no bf16 load first

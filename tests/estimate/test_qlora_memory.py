"""QLoRA in the estimate: a bf16 4-bit base is only frozen and runs the fused LoRA path (worker/train/adapters.py), so
its memory is the LoRA path's activations over the 4-bit weights with the rest in bf16, not peft's fp32-cast model."""

from __future__ import annotations

from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.gpus import gpu_table
from worker.estimate.model import GiB, peak_bytes
from worker.estimate.report import fits_in, workload_of
from worker.estimate.shapes import known_shape


def test_an_8b_qlora_job_fits_the_48_gib_gpus_it_runs_on():
    """8B QLoRA at 4 × 2048 peaks at 35.2 GiB on the H200 (docs/benchmarks.md): the estimate, which the checks stage
    refuses jobs on, must let it onto an L40S (48 GiB), as it did not while it modelled peft's fp32 casts (77.7)."""
    shape = known_shape("meta-llama/Llama-3.1-8B")
    assert shape is not None
    cfg = {"base_model": "meta-llama/Llama-3.1-8B", "learning_rate": 1e-4, "adapter": "qlora", "load_in_4bit": True}
    cfg.update(micro_batch_size=4, sequence_len=2048, lora_r=16, lora_target_linear=True)
    work = workload_of(TrainingConfig.model_validate(cfg), shape, DatasetSize())
    l40s = gpu_table().find("NVIDIA L40S")
    assert l40s is not None and fits_in(peak_bytes(work), l40s.memory_gib * GiB), peak_bytes(work) / GiB

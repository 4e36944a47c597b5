"""The loss head's memory in the estimate: ftw's fused cross-entropy makes one chunk of logits at a time and frees it
before the next (kernels/ftw_kernels/cross_entropy.py), so past one chunk the logits term stops growing with the
micro-batch; without the kernels the whole batch's logits are alive."""

from __future__ import annotations

from ftw_kernels.cross_entropy import CHUNK_LOGITS_BYTES
from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.model import FUSED_CE_CHUNK_BYTES, memory_parts
from worker.estimate.report import workload_of
from worker.estimate.shapes import known_shape


def logits_bytes(micro_batch_size: int, use_kernels: bool = True) -> int:
    shape = known_shape("meta-llama/Llama-3.2-1B")
    assert shape is not None
    cfg = {"base_model": "meta-llama/Llama-3.2-1B", "learning_rate": 1e-4, "adapter": "lora", "lora_r": 16}
    cfg.update(micro_batch_size=micro_batch_size, sequence_len=2048, lora_target_linear=True, use_kernels=use_kernels)
    return memory_parts(workload_of(TrainingConfig.model_validate(cfg), shape, DatasetSize()))["logits"]


def test_the_estimate_holds_the_kernels_chunk_size():
    assert FUSED_CE_CHUNK_BYTES == CHUNK_LOGITS_BYTES  # the orchestrator may not import torch: a copy, held here


def test_fused_logits_stop_growing_at_one_chunk():
    assert logits_bytes(1) < FUSED_CE_CHUNK_BYTES  # 2,048 rows × 128k vocabulary × bf16 = 0.49 GiB
    assert logits_bytes(4) == logits_bytes(8) == FUSED_CE_CHUNK_BYTES
    assert logits_bytes(8, use_kernels=False) > 4 * FUSED_CE_CHUNK_BYTES  # transformers + peft: every row's logits

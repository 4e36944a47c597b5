"""The recompute's price in the estimate follows the kind of checkpointing the run gets
(TrainingConfig.checkpoints_reentrant, the same decision worker/train/model.checkpointing_kwargs makes): reentrant
for supervised training of a dense model on one GPU, measured at ~0.8× the tokens/s of no checkpointing on the
8B shape; the non-reentrant kind (DDP, MoE, preference objectives, the config's own kwargs) pays its whole
recompute forward, ~2/3."""

from __future__ import annotations

from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.job import predict
from worker.estimate.model import tokens_per_s
from worker.estimate.report import workload_of
from worker.estimate.shapes import known_shape

BASE = {
    "base_model": "meta-llama/Llama-3.1-8B",
    "learning_rate": 1e-4,
    "adapter": "lora",
    "lora_r": 16,
    "lora_target_linear": True,
    "micro_batch_size": 4,
    "sequence_len": 2048,
}


def speed_ratio(**config) -> float:
    """tokens/s with checkpointing over tokens/s without, on one GPU."""
    shape = known_shape(BASE["base_model"])
    assert shape is not None
    speeds = []
    for checkpointing in (True, False):
        cfg = TrainingConfig.model_validate({**BASE, **config, "gradient_checkpointing": checkpointing})
        speeds.append(tokens_per_s(workload_of(cfg, shape, DatasetSize())))
    return speeds[0] / speeds[1]


def test_reentrant_recompute_costs_about_half_what_its_flops_say():
    assert 0.75 < speed_ratio() < 0.85
    assert speed_ratio(gradient_checkpointing_kwargs={"use_reentrant": True}) == speed_ratio()


def test_the_non_reentrant_kind_pays_its_whole_recompute():
    whole = speed_ratio(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert 0.6 < whole < 0.72 and whole < speed_ratio() - 0.08
    dpo = {"rl": "dpo", "datasets": [{"path": "p.jsonl", "type": "chatml.intel"}]}
    assert speed_ratio(**dpo) == whole


def test_several_gpus_take_the_non_reentrant_kind():
    cfg = TrainingConfig.model_validate({**BASE, "gradient_checkpointing": True})
    one, four = (predict(cfg, None, {}, gpu_count=n) for n in (1, 4))
    assert one is not None and four is not None
    assert one.workload.reentrant and not four.workload.reentrant
    assert tokens_per_s(four.workload) < tokens_per_s(one.workload)

"""The recompute's price in the estimate is the FLOPs the recompute runs: each decoder layer's forward again, not the
output head (it is in no layer), and with ftw's fused MLP not the down projection either (a recomputed layer's output
is never read: kernels/ftw_kernels/patches.py `_checkpoint_pass`). Measured on the 8B shape by each step's GPU time
(docs/benchmarks.md, 2026-12-05): 12,842 tok/s with offloaded checkpointing against 16,798 without, 0.76×; the whole
recompute, before the skip, ran at ~0.70×."""

from __future__ import annotations

import dataclasses

import pytest

from schemas.config import TrainingConfig
from worker.estimate.data_tokens import DatasetSize
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
    shape = known_shape(config.get("base_model", BASE["base_model"]))
    assert shape is not None
    speeds = []
    for checkpointing in (True, False):
        cfg = TrainingConfig.model_validate({**BASE, **config, "gradient_checkpointing": checkpointing})
        speeds.append(tokens_per_s(workload_of(cfg, shape, DatasetSize())))
    return speeds[0] / speeds[1]


def test_with_the_kernels_the_recompute_skips_the_down_projection():
    assert 0.72 < speed_ratio() < 0.78  # measured 0.76


def test_without_the_fused_mlp_the_recompute_runs_the_down_projection():
    """lora_mlp_kernel: false leaves the MLP to PEFT's layers (the other kernels on): nothing skips down's GEMM."""
    assert speed_ratio(lora_mlp_kernel=False) < speed_ratio() - 0.02


def test_without_the_kernels_the_recompute_runs_each_layer_whole():
    whole = speed_ratio(use_kernels=False)
    assert 0.66 < whole < 0.72 and whole < speed_ratio() - 0.04  # measured ~0.70 before the skip


@pytest.mark.parametrize("use_kernels", [True, False])
def test_the_output_head_is_not_recomputed(use_kernels):
    """The time checkpointing adds to a token does not grow with the vocabulary (the head's matmul)."""
    shape = known_shape(BASE["base_model"])
    assert shape is not None
    cfg = TrainingConfig.model_validate({**BASE, "use_kernels": use_kernels, "gradient_checkpointing": True})
    added = []
    for vocab in (32_000, 256_000):
        w = workload_of(cfg, dataclasses.replace(shape, vocab=vocab), DatasetSize())
        added.append(1 / tokens_per_s(w) - 1 / tokens_per_s(w.replace(checkpointing=False)))
    assert added[0] > 0 and added[1] == pytest.approx(added[0], rel=1e-9)


def test_the_kind_of_checkpointing_runs_the_same_flops():
    ratios = {speed_ratio(gradient_checkpointing_kwargs={"use_reentrant": kind}) for kind in (True, False)}
    assert ratios == {speed_ratio()}

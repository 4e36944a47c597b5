"""The speed estimate knows what the loss head costs: with the kernels, ftw's fused loss computes logits for the
tokens that have a label only (a chat dataset's prompts are not trained), so a prepared cache's trained-token share
makes the prediction faster; transformers' head and the rl losses take every row. A job's prediction, made at the
checks before preprocessing, takes the share once preprocessing has counted it."""

from __future__ import annotations

import pytest

from schemas.validate import validate_config
from tests.job.test_predicted_oom import CONFIG_8B
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.job import predict, with_prepared_data
from worker.estimate.model import flops_per_token, tokens_per_s
from worker.estimate.report import workload_of
from worker.estimate.shapes import known_shape

DATA = dict(tokens=50_000_000, samples=100_000)


def workload(share: float | None, **config):
    cfg = validate_config({**CONFIG_8B, **config}).value
    shape = known_shape(cfg.base_model)
    assert shape is not None
    return workload_of(cfg, shape, DatasetSize(**DATA, trained_share=share)), shape


def test_the_fused_head_costs_the_trained_tokens_only():
    (all_rows, shape), (half, _) = workload(None, use_kernels=True), workload(0.5, use_kernels=True)
    head = shape.vocab * shape.hidden
    assert flops_per_token(all_rows) - flops_per_token(half) == pytest.approx(4 * head * 0.5)
    assert 1.03 < tokens_per_s(half) / tokens_per_s(all_rows) < 1.10  # an 8B head: ~7% of a step's FLOPs


@pytest.mark.parametrize("config", [{"use_kernels": False}, {"rl": "dpo", "use_kernels": True}])
def test_every_row_to_the_head_without_the_fused_supervised_loss(config):
    cfg = {**config, "datasets": [{"path": "org/pairs", "type": "chatml.intel"}]} if "rl" in config else config
    (all_rows, _), (half, _) = workload(None, **cfg), workload(0.5, **cfg)
    assert flops_per_token(half) == flops_per_token(all_rows)


def test_the_jobs_prediction_takes_the_prepared_datas_share():
    cfg = validate_config(CONFIG_8B).value
    at_checks = predict(cfg, None, {})
    assert at_checks is not None and at_checks.workload.trained_share is None  # the Hub dataset: not counted yet
    prepared = with_prepared_data(at_checks, cfg, {"tokens": {"train": 1000, "trained": 400, "trained_share": 0.4}})
    assert prepared is not None and prepared.workload.trained_share == 0.4
    assert prepared.tokens_per_s("NVIDIA H200") > at_checks.tokens_per_s("NVIDIA H200")
    assert prepared.peak_bytes == at_checks.peak_bytes  # the memory is the batch's, whatever the head computes
    assert with_prepared_data(at_checks, cfg, {}) is at_checks  # an older cache's summary without the share
    assert with_prepared_data(None, cfg, {"tokens": {"trained_share": 0.4}}) is None

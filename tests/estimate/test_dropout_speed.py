"""`lora_dropout` on the fused path draws its masks inside the kernels and adds elementwise passes: its 8B step ran
1.045× the step without on one H100 (docs/benchmarks.md, the ninth session's two calls back to back). The estimate
prices it there, and only there: no measurement gives the factor of PEFT's layers (a DoRA run) or of the kernels-off
path, which are priced as before."""

from __future__ import annotations

import pytest

from schemas.validate import validate_config
from tests.job.test_predicted_oom import CONFIG_8B
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.gpus import gpu_table
from worker.estimate.model import DROPOUT_STEP, gpu_seconds, tokens_per_s
from worker.estimate.report import estimate, workload_of
from worker.estimate.shapes import known_shape

H100 = gpu_table().find("NVIDIA H100 80GB HBM3")


def workload(**config):
    cfg = validate_config({**CONFIG_8B, **config}).value
    return workload_of(cfg, known_shape(cfg.base_model), DatasetSize(tokens=60_000_000, samples=100_000))


def test_dropout_lengthens_the_fused_step_by_its_measured_share():
    plain, dropped = workload(lora_dropout=0.0), workload(lora_dropout=0.05)
    assert dropped.dropout and not plain.dropout
    assert gpu_seconds(dropped, H100.bf16_tflops) == pytest.approx(DROPOUT_STEP * gpu_seconds(plain, H100.bf16_tflops))
    assert tokens_per_s(dropped, H100.bf16_tflops) < tokens_per_s(plain, H100.bf16_tflops)


@pytest.mark.parametrize("off_the_fused_path", [{"peft_use_dora": True}, {"use_kernels": False}])
def test_off_the_fused_kernels_dropout_is_priced_as_before(off_the_fused_path):
    plain = workload(lora_dropout=0.0, **off_the_fused_path)
    dropped = workload(lora_dropout=0.05, **off_the_fused_path)
    assert gpu_seconds(dropped, H100.bf16_tflops) == gpu_seconds(plain, H100.bf16_tflops)


def test_a_jobs_estimate_of_time_and_cost_follows_dropout():
    def row(dropout):
        cfg = validate_config({**CONFIG_8B, "lora_dropout": dropout}).value
        (h100,) = estimate(cfg, {}, gpu_name="NVIDIA H100 80GB HBM3", tokens=60_000_000).rows
        return h100

    plain, dropped = row(0.0), row(0.05)
    assert dropped.tokens_per_s == pytest.approx(plain.tokens_per_s / DROPOUT_STEP)
    assert dropped.time_s > plain.time_s and dropped.cost_usd >= plain.cost_usd
    assert dropped.peak_bytes == plain.peak_bytes  # the backward keeps the dropped input instead of the input

"""The estimate in the job path: a job predicted not to fit the probed GPU fails at the checks, with
the numbers and the advice, unless it sets allow_oom_risk; every result's metrics carry GPU-seconds,
the GPU type, the estimated cost and predicted against measured memory and speed.

The check and the metrics are pure functions of the probe's data, so these tests hand them the
devices an H200 or an L4 worker reports; the end-to-end run is a real `ftw run` on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from schemas.job import validate_job
from schemas.validate import validate_config
from tests.checks.test_gpu_probe import fake_smi
from tests.conftest import REPO, child_env
from tests.job.conftest import example_job, write_job
from worker.errors import PredictedOutOfMemory
from worker.estimate.devices import Gpu, GpuProbe
from worker.estimate.gpus import gpu_table
from worker.estimate.job import check_fits, predict, run_metrics
from worker.estimate.model import GiB
from worker.estimate.shapes import model_shape
from worker.job.pipeline import run_job

CONFIG_8B = {
    "base_model": "meta-llama/Llama-3.1-8B-Instruct",
    "datasets": [{"path": "org/chat-data", "type": "chat_template"}],
    "adapter": "lora",
    "lora_r": 16,
    "lora_target_linear": True,
    "sequence_len": 2048,
    "sample_packing": True,
    "micro_batch_size": 4,
    "max_steps": 100,
    "learning_rate": 1e-4,
}


def gpu(name: str, total_mib: int, free_mib: int, index: int = 0) -> Gpu:
    return Gpu(index, f"GPU-{index:04d}", name, total_mib, total_mib - free_mib, free_mib)


def prediction(**config):
    cfg = validate_config({**CONFIG_8B, **config}).value
    return predict(cfg, None, {})


def test_a_job_that_does_not_fit_the_probed_gpu_fails_with_the_numbers_and_the_advice():
    p = prediction()
    assert 40 * GiB < p.peak_bytes < 55 * GiB  # docs/benchmarks.md: 47.8 GiB measured for this shape and batch
    l40s = [gpu("NVIDIA L40S", 46068, 45000)]
    with pytest.raises(PredictedOutOfMemory) as caught:
        check_fits(p, l40s, allow_oom_risk=False)
    e = caught.value
    assert e.code == "predicted_oom" and e.stage == "checks" and not e.retryable
    assert f"{p.peak_bytes / GiB:.1f} GiB" in e.message and "43.9 GiB free on GPU 0 (NVIDIA L40S)" in e.message
    assert (
        "gradient_checkpointing: true" in e.hint
        and "allow_oom_risk: true" in e.hint
        and "micro_batch_size: 2" in e.hint
    )
    advice = {a["change"].split(" (")[0]: a for a in e.details["advice"]}
    assert (
        advice["gradient_checkpointing: true"]["fits"]
        and advice["gradient_checkpointing: true"]["peak_memory_gib"] < 25
    )
    # a recompute forward less the down projection: 8B measured 12,842 tok/s against 16,798 without (0.76, H100)
    assert 0.72 < advice["gradient_checkpointing: true"]["speed_ratio"] < 0.88
    assert e.details["predicted_peak_gib"] == round(p.peak_bytes / GiB, 2) and e.details["fits"] is False


def test_allow_oom_risk_lets_it_run_and_a_gpu_with_room_passes():
    p = prediction()
    small = [gpu("NVIDIA L40S", 46068, 45000)]
    record = check_fits(p, small, allow_oom_risk=True)
    assert record["checked"] and record["fits"] is False and record["allow_oom_risk"] is True
    roomy = [gpu("NVIDIA H200", 143771, 143156)]
    assert check_fits(p, roomy, allow_oom_risk=False)["fits"] is True
    # with two GPUs the tightest one decides
    with pytest.raises(PredictedOutOfMemory, match="GPU 1"):
        check_fits(p, [roomy[0], gpu("NVIDIA H200", 143771, 30000, index=1)], allow_oom_risk=False)


def test_a_tight_fit_passes_with_a_warning():
    p = prediction()
    free_mib = int((p.peak_bytes + 1.05 * GiB) / (1 << 20))  # fits, but inside the model's ±15%
    record = check_fits(p, [gpu("NVIDIA A40", 46068, free_mib)], allow_oom_risk=False)
    assert record["fits"] and "within the estimate's ±15% error" in record["warning"]
    assert "warning" not in check_fits(p, [gpu("NVIDIA H200", 143771, 143156)], allow_oom_risk=False)


def test_checkpointing_in_the_config_is_what_makes_it_fit():
    assert check_fits(prediction(gradient_checkpointing=True), [gpu("NVIDIA L4", 23034, 22500)], allow_oom_risk=False)[
        "fits"
    ]


def test_no_gpu_or_unknown_model_is_not_checked():
    assert check_fits(prediction(), [], allow_oom_risk=False) == {"checked": False, "reason": "no GPU"}
    cfg = validate_config({**CONFIG_8B, "base_model": "someone/unknown-model"}).value
    assert predict(cfg, None, {"HF_HUB_OFFLINE": "1"}) is None


def test_run_metrics_price_the_gpu_seconds_and_compare_with_the_prediction():
    p = prediction()
    probe = GpuProbe(devices=[gpu("NVIDIA H200", 143771, 143156)])
    measured = {"peak_memory_gib": 47.8, "peak_memory_kind": "cuda_allocated", "tokens_per_s": 15000.0}
    m = run_metrics(p, probe, measured, job_seconds=600.4)
    price = gpu_table().find("NVIDIA H200").usd_per_s
    assert m["gpu_type"] == "NVIDIA H200" and m["gpu_count"] == 1 and m["gpu_seconds"] == 600.4
    assert m["estimated_cost_usd"] == round(math.ceil(600.4) * price, 4)
    assert m["predicted_peak_memory_gib"] == round(p.peak_bytes / GiB, 3)
    assert m["peak_memory_vs_predicted"] == round(47.8 / (p.peak_bytes / GiB), 3)
    assert m["tokens_per_s_vs_predicted"] == round(15000.0 / p.tokens_per_s("NVIDIA H200"), 3)
    two = run_metrics(p, GpuProbe(devices=[probe.devices[0], gpu("NVIDIA H200", 143771, 143156, 1)]), measured, 600.4)
    assert two["gpu_seconds"] == 1200.8 and two["estimated_cost_usd"] == round(1201 * price, 4)
    # the steps' own rate, where the run has it: the prediction has no first-step compiles in it
    steady = run_metrics(p, probe, {**measured, "steps_tokens_per_s": 16000.0}, job_seconds=600.4)
    assert steady["tokens_per_s_vs_predicted"] == round(16000.0 / p.tokens_per_s("NVIDIA H200"), 3)


@pytest.mark.slow
def test_ftw_run_on_cpu_reports_the_new_metrics(demo_volume, tmp_path):
    job = example_job(config={"max_steps": 3, "save_steps": 2, "logging_steps": 1})
    path = write_job(tmp_path / "job.json", job)
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--quiet", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=child_env(BASE_VOLUME=str(demo_volume), FTW_ALLOW_CPU="1"),
        timeout=600,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = result["metrics"]
    env = {"BASE_VOLUME": str(demo_volume)}
    cfg = validate_job({"input": job}, env=env).value.config
    expected = predict(cfg, model_shape(cfg, env)[0], env)
    assert m["gpu_type"] == "cpu" and m["gpu_count"] == 0 and m["gpu_seconds"] == 0
    assert (
        m["estimated_cost_usd"] is None and m["predicted_tokens_per_s"] is None
    )  # no RunPod GPU type to price or predict
    assert m["predicted_peak_memory_gib"] == round(expected.peak_bytes / GiB, 3) > 0
    assert m["peak_memory_vs_predicted"] is None  # the CPU's peak is RSS, not GPU memory
    assert m["steps_tokens_per_s"] > 0 and m["tokens_per_s"] > 0  # three steps: the rate from the first on
    checks = json.loads((demo_volume / "runs" / job["run_id"] / "checks.json").read_text())
    assert checks["memory"] == {"checked": False, "reason": "no GPU"}


def test_the_job_path_stops_at_the_checks_before_any_data_or_weights(demo_volume, tmp_path):
    """The probe reads a (scripted) nvidia-smi: an L4 with 1,100 MiB free fits the tiny model's
    weights (+1 GiB for CUDA) but not its predicted peak (the workspaces take 128 MiB more)."""
    smi = fake_smi(
        tmp_path, gpus="0, GPU-cccc3333-0000-0000-0000-000000000000, NVIDIA L4, 23034, 21934, 1100, 570.124.06\n"
    )
    env = {**os.environ, **smi, "BASE_VOLUME": str(demo_volume)}
    env.pop("FTW_ALLOW_CPU", None)
    # short limits: were the check missing, the job would fail later, and fast, not train
    result = run_job({"input": example_job(limits={"preprocess_s": 5, "train_s": 5})}, env=env)
    error = result["error"]
    assert result["status"] == "failed" and error["code"] == "predicted_oom" and error["stage"] == "checks", error
    assert "1.1 GiB free on GPU 0 (NVIDIA L4)" in error["message"] and "allow_oom_risk: true" in error["hint"]
    assert "preprocess_s" not in result["timings"] and not (demo_volume / "cache").exists()

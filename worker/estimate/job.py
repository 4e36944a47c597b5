"""The estimate in the job path: refuse at the checks a job predicted not to fit the probed GPU, and
put what the run cost and how far the prediction was off into the result's metrics.

    prediction = predict(cfg, shape, env, gpu_count)        # None when the model's shape is unknown
    check_fits(prediction, probe.devices, job.allow_oom_risk)   # raises PredictedOutOfMemory
    prediction = with_prepared_data(prediction, cfg, prepared.summary)   # the data's trained-token share
    metrics.update(run_metrics(prediction, probe, metrics, job_seconds))

Both checks are pure functions of data (the probe's devices are a list of `Gpu`), so tests give
them any GPU without one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from schemas.config import TrainingConfig
from worker.errors import PredictedOutOfMemory
from worker.estimate.data_tokens import dataset_size
from worker.estimate.devices import CONTEXT_HEADROOM, Gpu, GpuProbe
from worker.estimate.gpus import gpu_table
from worker.estimate.model import MEMORY_TOLERANCE, GiB, Workload, peak_bytes, tokens_per_s, weight_bytes
from worker.estimate.report import advice, fits_in, workload_of
from worker.estimate.shapes import ModelShape, known_shape


@dataclass(frozen=True)
class Prediction:
    workload: Workload
    peak_bytes: int
    weights_bytes: int

    def tokens_per_s(self, gpu_name: str) -> float | None:
        gpu = gpu_table().find(gpu_name)
        return None if gpu is None else tokens_per_s(self.workload, gpu.bf16_tflops)


def predict(
    cfg: TrainingConfig, shape: ModelShape | None, env: Mapping[str, str], gpu_count: int = 1
) -> Prediction | None:
    """Per-GPU peak of this job; `shape` as the disk estimate found it (local folder or the Hub),
    else ftw's table of common models; None when neither knows the model."""
    shape = shape if shape is not None and shape.layers else known_shape(cfg.base_model)
    if shape is None:
        return None
    w = workload_of(cfg, shape, dataset_size(cfg, env), gpu_count)
    return Prediction(w, peak_bytes(w), weight_bytes(w))


def with_prepared_data(
    prediction: Prediction | None, cfg: TrainingConfig, summary: Mapping[str, Any]
) -> Prediction | None:
    """The prediction once preprocessing has counted the trained tokens (the checks ran before it): the fused loss
    head computes the logits of those tokens' rows only, so a prompt-masked dataset trains faster than all rows."""
    share = (summary.get("tokens") or {}).get("trained_share")
    if prediction is None or not isinstance(share, (int, float)) or cfg.rl_method() is not None:
        return prediction
    return replace(prediction, workload=replace(prediction.workload, trained_share=float(share)))


def check_fits(prediction: Prediction | None, devices: Sequence[Gpu], allow_oom_risk: bool) -> dict[str, Any]:
    """What checks.json records; PredictedOutOfMemory (numbers and advice) when the predicted peak
    exceeds the tightest device's free memory and the job did not accept the risk."""
    if prediction is None or not devices:
        return {"checked": False, "reason": "no GPU" if prediction is not None else "model shape unknown"}
    tightest = min(devices, key=lambda g: g.free_mib)
    free = tightest.free_mib * (1 << 20)
    fits = fits_in(prediction.peak_bytes, free)
    record = {
        "checked": True,
        "predicted_peak_gib": round(prediction.peak_bytes / GiB, 2),
        "gpu": tightest.name,
        "free_gib": round(free / GiB, 2),
        "fits": fits,
        "allow_oom_risk": allow_oom_risk,
    }
    if fits and prediction.peak_bytes * (1 + MEMORY_TOLERANCE) + CONTEXT_HEADROOM > free:
        record["warning"] = (
            f"the predicted peak GPU memory, {prediction.peak_bytes / GiB:.1f} GiB (+1 GiB for CUDA), is within the "
            f"estimate's ±{MEMORY_TOLERANCE:.0%} error of the {free / GiB:.1f} GiB free on {tightest.name}: "
            "the run may still run out of memory (docs/estimate.md)"
        )
    if fits or allow_oom_risk:
        return record
    gpu = gpu_table().find(tightest.name)
    options = advice(prediction.workload, free, gpu.bf16_tflops if gpu else 989.4)
    listed = "; ".join(
        f"{a.change} → {a.peak_bytes / GiB:.1f} GiB{'' if a.fits else ' (still too much)'}, "
        f"{a.speed_ratio:.2f}× the speed"
        for a in options
    )
    raise PredictedOutOfMemory(
        f"predicted peak GPU memory {prediction.peak_bytes / GiB:.1f} GiB (+{CONTEXT_HEADROOM / GiB:.0f} GiB for CUDA) "
        f"exceeds the {free / GiB:.1f} GiB free on GPU {tightest.index} ({tightest.name}); nothing was downloaded or "
        "trained",
        f"change the config: {listed}; or use a larger GPU (`ftw estimate JOB.json` lists them), "
        "or set allow_oom_risk: true in the job to run anyway",
        stage="checks",
        details={
            **record,
            "advice": [
                {
                    "change": a.change,
                    "peak_memory_gib": round(a.peak_bytes / GiB, 2),
                    "fits": a.fits,
                    "speed_ratio": round(a.speed_ratio, 3),
                }
                for a in options
            ],
        },
    )


def run_metrics(
    prediction: Prediction | None, probe: GpuProbe, measured: Mapping[str, Any], job_seconds: float
) -> dict[str, Any]:
    """GPU-seconds, GPU type, estimated cost (RunPod's price of that type, seconds rounded up), and
    predicted against measured peak memory and tokens/s (measured / predicted)."""
    name = probe.devices[0].name if probe.devices else "cpu"
    gpu_seconds = job_seconds * probe.count
    gpu = gpu_table().find(name) if probe.devices else None
    predicted_peak = None if prediction is None else prediction.peak_bytes / GiB
    predicted_speed = None if prediction is None or gpu is None else prediction.tokens_per_s(gpu.name)
    on_gpu = measured.get("peak_memory_kind") == "cuda_allocated"
    return {
        "gpu_type": name,
        "gpu_count": probe.count,
        "gpu_seconds": round(gpu_seconds, 1),
        "estimated_cost_usd": None if gpu is None else round(math.ceil(gpu_seconds) * gpu.usd_per_s, 4),
        "predicted_peak_memory_gib": None if predicted_peak is None else round(predicted_peak, 3),
        "predicted_tokens_per_s": None if predicted_speed is None else round(predicted_speed, 1),
        "peak_memory_vs_predicted": ratio(measured.get("peak_memory_gib"), predicted_peak) if on_gpu else None,
        # the steps' own rate where the run recorded two or more: the prediction leaves the first step's compiles out
        "tokens_per_s_vs_predicted": ratio(
            measured.get("steps_tokens_per_s") or measured.get("tokens_per_s"), predicted_speed
        ),
    }


def ratio(measured: Any, predicted: float | None) -> float | None:
    if not isinstance(measured, (int, float)) or not predicted:
        return None
    return round(measured / predicted, 3)

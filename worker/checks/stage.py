"""The checks stage, once per job in the orchestrator: every machine requirement of the job, before
anything is downloaded, prepared or trained.

    report = run_checks(CheckInput(config, env, child_env, volume, ...), progress)

In order: the disk estimate against the volume, the predicted GPU memory (worker/estimate), the GPU
probe (the weights must fit each device's free memory), the predicted peak against the tightest
device (allow_oom_risk lets it run anyway), and what the config needs installed or configured
(worker/checks/machine.py). The first that fails raises its typed FtwError (InfraError,
PredictedOutOfMemory, JobSpecError) with what to change; the report is what checks.json records
and what the stage children need (the env that shows them exactly the probed GPUs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from worker.checks.disk import check_disk, estimate_disk
from worker.checks.gpu import cpu_allowed, parse_visible_devices, probe, stage_env
from worker.checks.machine import check_machine
from worker.estimate.devices import GpuProbe
from worker.estimate.job import Prediction, check_fits, predict


@dataclass(frozen=True)
class CheckInput:
    config: TrainingConfig
    env: Mapping[str, str]  # the worker's: CUDA_VISIBLE_DEVICES, the operator's FTW_* switches, BASE_VOLUME
    child_env: Mapping[str, str]  # what the stage children get (job credentials included), as they will read it
    volume: Path  # the run folder's volume: its filesystem must hold the run
    allow_cpu: bool = False  # the job asks for a CPU run (the operator decides: FTW_ALLOW_CPU)
    allow_oom_risk: bool = False  # run even when the predicted peak exceeds the free GPU memory
    datasets: bool = True  # the local dataset files too (False when the prepared data is already there)


@dataclass(frozen=True)
class CheckReport:
    gpus: GpuProbe
    gpu_env: dict[str, str]  # what a stage child needs to see exactly these GPUs, with a sane allocator
    disk: dict[str, Any]
    prediction: Prediction | None  # ftw estimate's peak memory and speed; None when the model's shape is unknown
    memory: dict[str, Any]  # the predicted peak against the tightest GPU
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """checks.json's content."""
        return {"disk": self.disk, "gpu": self.gpus.as_dict(), "memory": self.memory}


def run_checks(check: CheckInput, progress: Callable[[str], None] = lambda text: None) -> CheckReport:
    """Every check in order (`progress` hears which devices were found); raises the first failure."""
    cfg = check.config
    estimate, shape = estimate_disk(cfg, check.env)
    disk = check_disk(estimate, check.volume)
    prediction = predict(cfg, shape, check.env, visible_count(check.env))
    gpus = probe(check.env, prediction.weights_bytes if prediction else 0, cpu_allowed(check.env, check.allow_cpu))
    progress(f"devices: {devices_text(gpus)}")
    memory = check_fits(prediction, gpus.devices, check.allow_oom_risk)
    capabilities = [d.compute_capability for d in gpus.devices]
    check_machine(cfg, gpus.count > 0, check.child_env, datasets=check.datasets, capabilities=capabilities)
    warnings = [memory["warning"]] if memory.get("warning") else []
    engine = cfg.trl.vllm_gpu_memory_utilization if cfg.trl and cfg.trl.use_vllm else 0.0  # trl.use_vllm's engine
    gpu_env = stage_env(gpus, check.env, prediction.peak_bytes if prediction else None, engine)
    memory = {**memory, "allocator": gpu_env["PYTORCH_CUDA_ALLOC_CONF"]} if gpus.devices else memory
    return CheckReport(gpus, gpu_env, disk, prediction, memory, warnings)


def visible_count(env: Mapping[str, str]) -> int:
    """The GPUs the job will shard over, as CUDA_VISIBLE_DEVICES names them (before the probe: the
    probe needs the prediction's weight size)."""
    wanted = parse_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
    return len(wanted) if wanted else 1


def devices_text(gpus: GpuProbe) -> str:
    if gpus.cpu_only:
        return "CPU only"
    return ", ".join(f"{d.name} ({d.free_mib} MiB free)" for d in gpus.devices)

"""`ftw train`: the job path of `worker/job/pipeline.py` for a validated config in the user's own run
folder, published nowhere (the results stay in the folder)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from schemas.job import JobInput, run_id_from_job_id
from schemas.paths import base_volume
from schemas.secrets import Redactor
from worker.job.pipeline import JobPipeline, LocalTraining
from worker.job.rundir import RunFolder
from worker.job.supervisor import StopSignal
from worker.job.updates import ProgressSink
from worker.train.summary import TrainSummary


@dataclass(frozen=True)
class TrainOutcome:
    """`ftw train`'s job result, with what a terminal shows of it."""

    result: dict[str, Any]
    run_dir: Path
    finished_before: bool  # the folder held this config's finished training: nothing was redone
    summary: TrainSummary | None  # summary.json, when training finished


def train_config(
    cfg: TrainingConfig,
    local: LocalTraining,
    *,
    env: Mapping[str, str] | None = None,
    on_progress: ProgressSink | None = None,
    stop: StopSignal | None = None,
) -> TrainOutcome:
    """`ftw train`: the job of a validated config in the user's run folder, published nowhere."""
    env = dict(os.environ if env is None else env)
    started = time.monotonic()
    # a terminal run uses the CPU where there is no GPU; a predicted OOM is a warning, not a refusal
    job = JobInput(
        run_id=run_id_from_job_id(local.run_dir.name), config=cfg, publish=[], allow_cpu=True, allow_oom_risk=True
    )
    pipeline = JobPipeline(job, env, {}, Redactor.for_job(env, {}), on_progress, stop, started, local=local)
    result = pipeline.run()
    run_dir = RunFolder.of_user(local.run_dir, base_volume(env), job.run_id).path
    summary = TrainSummary.read(run_dir) if result.get("status") == "completed" else None
    return TrainOutcome(result, run_dir, pipeline.finished_before, summary)

"""One job, top to bottom — the one orchestrator: `handler.py` (RunPod) and `ftw run` call `run_job`,
`ftw train` calls `worker.job.local_training.train_config` (the same job, from a config and a run folder).

    validate → run folder (safe path, lock, resumable or refused) → checks (disk, GPU, memory, machine)
             → preprocess (child; a Hub base model downloads beside it) → train (child) → publish → result

`run_job(raw, ...)` never raises for anything a job can cause: it returns the result
`{run_id, status: "completed", artifacts, metrics, timings, run_dir, warnings}` or the failure
`{run_id, status: "failed"|"cancelled"|"preempted", error: {code, stage, message, hint, retryable,
log_tail, details}, timings}`, with every secret redacted. Progress goes to `on_progress` while it
runs; `stop.request("cancelled"|"preempted")` from another thread ends it cleanly (the running
child gets SIGTERM and a grace period to checkpoint). A run_id seen before resumes: stages recorded
as finished in its state.json are skipped, and training continues from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.job import JobInput, parse_s3_config, validate_job
from schemas.paths import base_volume
from schemas.secrets import CONFIG_SECRETS_ENV, Redactor, child_env, job_credential_env, masked_values
from worker.checks import CheckInput, run_checks
from worker.data.prepared import PreparedCache
from worker.errors import FtwError, JobSpecError
from worker.estimate.devices import GpuProbe
from worker.estimate.job import Prediction, run_metrics, with_prepared_data
from worker.job import children, template
from worker.job.first_step import FirstStepClock
from worker.job.prefetch import ModelPrefetch
from worker.job.publishing import Publishing
from worker.job.result import failure_result, internal_error, invalid_job, raw_run_id
from worker.job.rundir import RunDir, RunFolder, open_folder, write_json_atomic
from worker.job.supervisor import Stage, StageRun, StopSignal, next_attempt_dir, run_stage, stage_failure
from worker.job.updates import ProgressSink, Throttle, event_update, stage_update
from worker.job.warmup import KernelWarmup
from worker.publish import PublishPlan
from worker.train.gpu_clocks import gpu_warnings
from worker.train.summary import TrainSummary

MAX_ENV_VALUE = 64 * 1024  # the masked config values travel in one environment variable (Linux: at most 128 KB)


@dataclass(frozen=True)
class LocalTraining:
    """What `ftw train` changes in a job: a run folder of the user's, nothing published (the results
    stay in the folder), and how many train processes to start."""

    run_dir: Path
    nproc: int | None = None  # None: one per visible GPU


def run_job(
    raw: Any,
    *,
    job_id: str | None = None,
    env: Mapping[str, str] | None = None,
    s3_config: Mapping[str, Any] | None = None,
    on_progress: ProgressSink | None = None,
    stop: StopSignal | None = None,
) -> dict[str, Any]:
    env = dict(os.environ if env is None else env)
    started = time.monotonic()
    report = validate_job(raw, job_id, env)
    bucket_config, s3_config_problems = parse_s3_config(s3_config)
    report.errors += s3_config_problems
    if not report.valid:
        result = failure_result(invalid_job(report), raw_run_id(raw))
        result["timings"] = {"validate_s": round(time.monotonic() - started, 4)}
        return Redactor.for_job(env, {}, s3_config).record(result)
    job: JobInput = report.value
    credentials = job_credential_env(job.credentials, s3_config)
    redactor = Redactor.for_job(env, credentials, s3_config)
    plan = PublishPlan.resolve(job, bucket_config, env, redactor)  # targets and credentials: once per job
    pipeline = JobPipeline(job, env, credentials, redactor, on_progress, stop, started, plan=plan)
    pipeline.warnings.extend(i.as_dict() for i in report.warnings)
    return pipeline.run()


class JobPipeline:
    """The steps of one validated job, in order; each raises a typed FtwError when it cannot go on."""

    def __init__(
        self,
        job: JobInput,
        env: dict[str, str],
        credentials: dict[str, str],
        redactor: Redactor,
        sink: ProgressSink | None,
        stop: StopSignal | None,
        started: float,
        *,
        plan: PublishPlan | None = None,
        local: LocalTraining | None = None,
    ):
        self.job, self.env, self.credentials, self.redactor = job, env, credentials, redactor
        self.stop = stop or StopSignal()
        self.local = local  # ftw train; None for a job from RunPod or `ftw run`
        self.started = started
        self.progress = Throttle(sink or (lambda u: None), float(env.get("FTW_PROGRESS_INTERVAL_S") or 2.0))
        self.timings: dict[str, float] = {"validate_s": round(time.monotonic() - started, 4)}
        self.warnings: list[dict[str, str]] = []
        self.finished_before = False
        self.folder: RunFolder | None = None
        self.checks_report: dict[str, Any] | None = None  # checks.json, once the checks passed
        self.gpu_env: dict[str, str] = {}
        self.gpu_count = 0
        self.gpu_probe = GpuProbe(cpu_only=True)
        self.prediction: Prediction | None = None  # ftw estimate's peak memory and speed for this job
        # a job's publish side (None for ftw train, whose results stay in the run folder)
        self.publishing = None if plan is None else Publishing(job, plan, self.progress, self.stop, self.warnings)
        self.template: template.StageTemplate | None = None  # forks the stage children pre-imported
        self.warmup: KernelWarmup | None = None  # compiles the job's kernels until the train stage's first step
        self.started_wall = time.time() - (time.monotonic() - started)  # children's events carry wall time
        self.first_step = FirstStepClock(self.started_wall)

    # ---- the job path -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The result (success or typed failure), also left in RUN_DIR/result.json once the folder is open."""
        try:
            early = self.look_at_folder()
            if early is not None:
                return early
            assert self.folder is not None
            if self.folder.claimed_by == "training":  # nothing is written into a user's folder before the checks pass
                self.checks(self.folder.state())
            with self.step("run_dir", "opening the run folder"):
                run = open_folder(self.folder)
        except FtwError as e:  # nothing of this job is on disk
            return self.finish(failure_result(e, self.job.run_id))
        except Exception as e:  # a bug before the run folder was open
            return self.finish(failure_result(internal_error(e, self.redactor), self.job.run_id))
        try:
            return self.run_in(run)
        finally:
            self.let_go(run)

    def look_at_folder(self) -> dict[str, Any] | None:
        """The result, when the run folder already answers the job: finished earlier, or refused."""
        with self.step("run_dir", "preparing the run folder"):
            folder = self.folder = self.run_folder()
            done = self.finished_result(folder)
            if done is not None:
                self.finished_before = True
                self.progress(stage_update(self.job.run_id, "run_dir", "this run finished earlier: its result stands"))
                return self.finish({k: v for k, v in done.items() if k != "timings"})
            refused = self.refusal(folder)  # before anything is written: a refused run leaves the folder as it was
            return None if refused is None else self.finish(failure_result(refused, self.job.run_id))

    def run_folder(self) -> RunFolder:
        base = base_volume(self.env)
        if self.local is None:
            return RunFolder.of_job(base, self.job.run_id)
        return RunFolder.of_user(self.local.run_dir, base, self.job.run_id)

    def run_in(self, run: RunDir) -> dict[str, Any]:
        assert self.folder is not None
        refused = self.refusal(self.folder)  # again under the lock: another job may have claimed it meanwhile
        if refused is not None:  # the run folder (and its result.json) stays as the earlier job left it
            return self.finish(failure_result(refused, self.job.run_id))
        try:
            result = self.run_stages(run)
        except FtwError as e:
            result = failure_result(e, self.job.run_id)
        except Exception as e:  # a bug in ftw: the same failure shape, and result.json is still written
            result = failure_result(internal_error(e, self.redactor), self.job.run_id)
        result = self.finish(result)
        write_json_atomic(run.path / "result.json", result)
        return result

    def run_stages(self, run: RunDir) -> dict[str, Any]:
        config_path = self.write_config(run)
        untrained = self.trained(run.path, run.state) is None
        if self.checks_report is None and untrained:
            self.checks(run.state)
        if self.checks_report is not None:
            write_json_atomic(run.path / "checks.json", self.redactor.data(self.checks_report))
        # a Hub base model downloads beside preprocessing; the job's kernels compile beside it too, and on beside
        # the train stage's start-up and model loading, until its first step (the train child ends it or waits it out)
        env, gpus, template = self.stage_env(), self.gpu_count, self.template
        cfg = self.job.config
        with KernelWarmup.beside(cfg, config_path, env, gpus, template, run.logs, self.redactor, untrained) as warmup:
            with ModelPrefetch.beside(cfg, env, run.logs, self.redactor, untrained) as prefetch:
                prepared = self.preprocess(run, config_path)
                if prefetch is not None:
                    prefetch.wait(self.stop, self.progress, self.job.run_id)
            self.warmup = warmup
            metrics = self.train(run, config_path, prepared)
        # the host held the GPU's clock down, or left it idle
        self.warnings += [{"loc": "gpu", "msg": msg} for msg in gpu_warnings(metrics, self.job.config.sample_packing)]
        artifacts = self.publish(run)
        prediction = with_prepared_data(self.prediction, self.job.config, prepared.summary)
        metrics = {**metrics, **run_metrics(prediction, self.gpu_probe, metrics, time.monotonic() - self.started)}
        return {
            "run_id": self.job.run_id,
            "status": "completed",
            "artifacts": artifacts,
            "metrics": metrics,
            "run_dir": str(run.path),
            "warnings": self.warnings,
        }

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        self.progress.flush()
        result["timings"] = {**self.timings, "total_s": round(time.monotonic() - self.started, 3)}
        return self.redactor.record(result)

    def let_go(self, run: RunDir) -> None:
        if self.publishing is None:
            run.close()
        else:
            self.publishing.let_go(run.close)

    def checks(self, state: dict[str, Any]) -> None:
        """What this machine must have for this job, before any expensive work."""
        assert self.folder is not None
        self.template = template.shared(child_env(self.env, {}, {}))  # imports while the checks run
        with self.step("checks", "checking disk and GPU"):
            check = CheckInput(
                self.job.config,
                self.env,
                self.stage_env(),
                self.folder.base,
                allow_cpu=self.job.allow_cpu,
                allow_oom_risk=self.job.allow_oom_risk,
                # ftw train leaves the dataset files to its preprocess child, which names file, row and field
                datasets=self.local is None and "preprocess" not in (state.get("stages") or {}),
            )
            report = run_checks(check, lambda text: self.progress(stage_update(self.job.run_id, "checks", text)))
            self.gpu_probe, self.gpu_env, self.prediction = report.gpus, report.gpu_env, report.prediction
            self.gpu_count = report.gpus.count
            self.warnings.extend({"loc": "config", "msg": warning} for warning in report.warnings)
            self.checks_report = report.as_dict()

    def preprocess(self, run: RunDir, config_path: Path) -> PreparedCache:
        done = run.stage_done("preprocess")
        if done and children.read_manifest(Path(done["cache_dir"])):
            self.progress(stage_update(self.job.run_id, "preprocess", "prepared data found from an earlier attempt"))
            return PreparedCache(Path(done["cache_dir"]), done.get("summary") or {})
        with self.step("preprocess", "preparing the datasets"):
            output = run.path / children.PREPARED_NAME
            output.unlink(missing_ok=True)  # what an earlier attempt reported is not this one's
            argv = children.preprocess_argv(config_path, output)
            child = self.supervise(run, "preprocess", argv, self.job.limits.preprocess_s)
            try:
                prepared = children.prepared_data(output)
            except FtwError as e:
                e.log_tail = child.log_tail()
                raise
        run.mark_done("preprocess", {"cache_dir": str(prepared.cache_dir), "summary": prepared.summary})
        return prepared

    def trained(self, run_path: Path, state: dict[str, Any]) -> TrainSummary | None:
        """Training's output when an earlier attempt finished it and it is still in the run folder."""
        if "train" not in (state.get("stages") or {}):
            return None
        cfg = self.job.config
        return children.trained_output(run_path, cfg.is_full_finetune(), cfg.merge_lora)

    def train(self, run: RunDir, config_path: Path, prepared: PreparedCache) -> dict[str, Any]:
        cfg = self.job.config
        if self.trained(run.path, run.state) is not None:
            self.progress(stage_update(self.job.run_id, "train", "training finished in an earlier attempt"))
            metrics: dict[str, Any] = (run.stage_done("train") or {})["metrics"]
            return metrics
        run.forget("publish")  # training (re)starts: anything published came from other weights
        with self.step("train", "fine-tuning"):
            resume_from = self.resume_step(run)
            argv = children.train_argv(config_path, run.path, prepared.cache_dir, self.processes())
            if self.publishing is not None:
                self.publishing.start_uploader(run.path)
            self.first_step.train_started()
            try:
                self.supervise(run, "train", argv, self.job.limits.train_s)
            except (
                FtwError
            ) as e:  # run() stops the uploader: a preempted run's last checkpoint still reaches the bucket
                e.details["checkpoint_step"] = children.newest_checkpoint(run.path)
                raise
            summary = children.training_outputs(run.path, cfg.is_full_finetune(), cfg.merge_lora)
        metrics = dict(summary.metrics)
        if resume_from is not None:
            metrics["resumed_from_step"] = resume_from
        run.mark_done("train", {"metrics": metrics, "output": "model" if cfg.is_full_finetune() else "adapter"})
        return metrics

    def processes(self) -> int:
        """Train processes: what `ftw train --nproc` says, else one per GPU the checks found."""
        nproc = self.local.nproc if self.local is not None else None
        return nproc if nproc is not None else self.gpu_count

    def resume_step(self, run: RunDir) -> int | None:
        """The step training resumes from: the newest checkpoint on the volume (after the published
        one was brought back, when it is newer)."""
        if self.publishing is not None:
            self.publishing.restore_checkpoint(run.path)
        step = children.newest_checkpoint(run.path)
        if step is not None:
            self.progress(stage_update(self.job.run_id, "train", f"resuming from checkpoint-{step}"))
        return step

    def publish(self, run: RunDir) -> list[dict[str, Any]]:
        if self.publishing is None:  # ftw train: the results stay in the run folder
            return []
        done = run.stage_done("publish")
        if done:
            artifacts: list[dict[str, Any]] = done["artifacts"]
            return artifacts
        with self.step("publish", "publishing"):
            artifacts = self.publishing.publish(run.path)
        run.mark_done("publish", {"artifacts": artifacts})
        return artifacts

    # ---- the run folder ------------------------------------------------------------------------
    def finished_result(self, folder: RunFolder) -> dict[str, Any] | None:
        """The result of this run when it completed before with the same config and its output is still
        there: a finished run is read-only, so any number of resubmits at once (no lock) all report it done."""
        result = folder.completed_result(self.public_job["config"]) if self.job.resume else None
        return result if result and self.trained(folder.path, folder.state()) else None

    def refusal(self, folder: RunFolder) -> JobSpecError | None:
        return folder.refusal(self.public_job["config"], self.job.resume)

    @functools.cached_property
    def job_dict(self) -> dict[str, Any]:
        """The job as written to disk, before redaction (dumped once: a config may be megabytes)."""
        return self.job.public_dict()

    @functools.cached_property
    def public_job(self) -> dict[str, Any]:
        """job.json's content: the job without credentials, every secret masked (redacted once)."""
        return self.redactor.record(self.job_dict)

    @functools.cached_property
    def config_secrets(self) -> list[list[Any]]:
        """The config values config.json holds masked (schemas.secrets.masked_values); the children
        get them in their environment."""
        values = masked_values(self.job_dict["config"], self.public_job["config"])
        if len(json.dumps(values)) > MAX_ENV_VALUE:
            raise JobSpecError(
                f"config values holding a URL password or signature add up to over {MAX_ENV_VALUE // 1024} KB",
                "keep such values to the URLs themselves (a presigned URL is well under 4 KB)",
                stage="run_dir",
            )
        return values

    def write_config(self, run: RunDir) -> Path:
        """job.json and config.json (for the children), both secret-free."""
        _ = self.config_secrets  # a config whose masked values cannot reach the children is refused first
        return run.write_job(self.public_job)

    # ---- running children ----------------------------------------------------------------------
    def stage_env(self) -> dict[str, str]:
        assert self.folder is not None
        extra = {
            **children.compile_cache_env(self.env, self.folder.base),
            **self.gpu_env,
            "BASE_VOLUME": str(self.folder.base),
        }
        if self.config_secrets:
            extra[CONFIG_SECRETS_ENV] = json.dumps(self.config_secrets)
        return child_env(self.env, self.credentials, extra)

    def supervise(self, run: RunDir, name: str, argv: list[str], limit_s: float | None) -> StageRun:
        self.stop.check()
        stage = Stage(
            name,
            argv,
            self.stage_env(),
            next_attempt_dir(run.logs, name),
            time_limit_s=limit_s,
            no_progress_s=self.job.limits.no_progress_s,
            grace_s=float(self.env.get("FTW_STOP_GRACE_S") or 60),
            template=self.template,
        )
        child = run_stage(stage, self.stop, self.redactor, lambda event: self.on_event(name, event))
        error = stage_failure(child)
        if error is not None:
            raise error
        return child

    def on_event(self, stage: str, event: dict[str, Any]) -> None:
        self.timings.update(self.first_step.observe(stage, event))  # what a user waits for, and where it went
        if stage == "train" and event.get("event") == "first_step" and self.warmup is not None:
            self.warmup.stop("the first step was done")  # ended before it by the train child: reaped and logged
        self.progress(event_update(self.job.run_id, stage, event))

    @contextlib.contextmanager
    def step(self, name: str, message: str) -> Iterator[None]:
        self.stop.check()
        self.progress(stage_update(self.job.run_id, name, message))
        started = time.monotonic()
        try:
            yield
        except FtwError as e:
            e.stage = e.stage or name
            raise
        finally:
            self.timings[f"{name}_s"] = round(time.monotonic() - started, 3)

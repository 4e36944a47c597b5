"""One job, top to bottom — the function both `handler.py` (RunPod) and `ftw run` call.

    validate → run dir (safe path, lock, writable, disk estimate) → GPU probe
             → preprocess (child) → train (child) → publish → result

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
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from schemas.job import JobInput, check_run_id, validate_job
from schemas.paths import base_volume
from schemas.secrets import (
    CONFIG_SECRETS_ENV,
    Redactor,
    child_env,
    job_credential_env,
    masked_values,
    s3_config_problem,
)
from worker.errors import Cancelled, FtwError, JobSpecError, Preempted, PublishError
from worker.estimate.job import Prediction, check_fits, predict, run_metrics
from worker.job import children, gpu, template
from worker.job.estimate import check_disk, estimate_disk
from worker.job.rundir import RunDir, changed_keys, open_run_dir, read_json, resolve_run_dir, write_json_atomic
from worker.job.supervisor import Stage, StageRun, StopSignal, next_attempt_dir, run_stage, stage_failure
from worker.job.updates import ProgressSink, Throttle, event_update, stage_update
from worker.preflight import check_machine

STOP_ERRORS = {"cancelled": Cancelled, "preempted": Preempted}
PUBLISH_LET_GO_S = 30.0  # how long the job waits for an abandoned publish to stop (the run stays locked until it has)
SHOWN_PROBLEMS = 10  # in the failure message of an invalid job; details.errors has them all (at most 100)
MAX_ENV_VALUE = 64 * 1024  # the masked config values travel in one environment variable (Linux: at most 128 KB)
STATUS_BY_CODE = {"cancelled": "cancelled", "preempted": "preempted"}


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
    if (problem := s3_config_problem(s3_config)) is not None:
        report.error("s3Config", problem)
    if not report.valid:
        problems = "; ".join(str(i) for i in report.errors[:SHOWN_PROBLEMS])
        if len(report.errors) > SHOWN_PROBLEMS:
            problems += f"; and {len(report.errors) - SHOWN_PROBLEMS} more (details.errors)"
        error = JobSpecError(
            f"the job is invalid ({len(report.errors)} problem(s)): {problems}",
            "fix every problem listed (the same list as `ftw validate JOB.json`); nothing was started",
            stage="validate",
            details={
                "errors": [i.as_dict() for i in report.errors],
                "warnings": [i.as_dict() for i in report.warnings],
            },
        )
        result = failure_result(error, raw_run_id(raw))
        result["timings"] = {"validate_s": round(time.monotonic() - started, 4)}
        return Redactor.for_job(env, {}, s3_config).data(result)
    job: JobInput = report.value
    credentials = job_credential_env(job.credentials, s3_config)
    redactor = Redactor.for_job(env, credentials, s3_config)
    pipeline = JobPipeline(
        job, env, credentials, redactor, on_progress or (lambda u: None), stop or StopSignal(), started
    )
    pipeline.timings["validate_s"] = round(time.monotonic() - started, 4)
    pipeline.warnings = [i.as_dict() for i in report.warnings]
    try:
        return pipeline.run()
    except FtwError as e:  # the run folder could not be opened: nothing of this job is on disk
        return pipeline.finish(failure_result(e, job.run_id))
    except Exception as e:  # a bug before the run folder was open
        return pipeline.finish(failure_result(internal_error(e, redactor), job.run_id))


def internal_error(e: Exception, redactor: Redactor) -> FtwError:
    """A bug in ftw as the one failure shape (its traceback, redacted, in the worker's log)."""
    print(redactor.text(traceback.format_exc()), file=sys.stderr, flush=True)
    return FtwError(
        f"internal error in the orchestrator: {type(e).__name__}: {e}",
        "this is a bug in ftw; resubmitting the same run_id keeps every finished stage",
        stage="orchestrator",
    )


def failure_result(error: FtwError, run_id: str | None) -> dict[str, Any]:
    result = error.as_result(run_id)
    result["status"] = STATUS_BY_CODE.get(error.code, "failed")
    return result


def raw_run_id(raw: Any) -> str | None:
    inner = raw.get("input", raw) if isinstance(raw, dict) else None
    value = inner.get("run_id") if isinstance(inner, dict) else None
    return value if check_run_id(value) is None else None


class JobPipeline:
    """The steps of one validated job, in order; each raises a typed FtwError when it cannot go on."""

    def __init__(
        self,
        job: JobInput,
        env: dict[str, str],
        credentials: dict[str, str],
        redactor: Redactor,
        sink: ProgressSink,
        stop: StopSignal,
        started: float,
    ):
        self.job, self.env, self.credentials, self.redactor, self.stop = job, env, credentials, redactor, stop
        self.started = started
        self.progress = Throttle(sink, float(env.get("FTW_PROGRESS_INTERVAL_S") or 2.0))
        self.timings: dict[str, float] = {}
        self.warnings: list[dict[str, str]] = []
        self.gpu_env: dict[str, str] = {}
        self.gpu_count = 0
        self.gpu_probe = gpu.GpuProbe(cpu_only=True)
        self.prediction: Prediction | None = None  # ftw estimate's peak memory and speed for this job
        self.uploader: Any = None  # worker.publish's checkpoint uploader while and after training
        self.publisher: threading.Thread | None = None  # publish_run, when it ran
        self.config_secrets: list[
            list[Any]
        ] = []  # config values config.json holds masked (schemas.secrets.masked_values)
        self.template: template.StageTemplate | None = None  # forks the stage children pre-imported
        self.started_wall = time.time() - (time.monotonic() - started)  # children's events carry wall time

    # ---- the job path -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The result (success or typed failure), also left in RUN_DIR/result.json before the lock goes."""
        with self.step("run_dir", "preparing the run folder"):
            done = self.finished_result()
            if done is not None:
                self.progress(stage_update(self.job.run_id, "run_dir", "this run finished earlier: its result stands"))
                return self.finish({k: v for k, v in done.items() if k != "timings"})
            run = open_run_dir(base_volume(self.env), self.job.run_id)
        try:
            try:
                self.check_resumable(run)
            except JobSpecError as e:  # refused: the run folder (and its result.json) stays as the earlier job left it
                return self.finish(failure_result(e, self.job.run_id))
            try:
                result = self.run_stages(run)
            except FtwError as e:
                result = failure_result(e, self.job.run_id)
            except Exception as e:  # a bug in ftw: the same failure shape, and result.json is still written
                result = failure_result(internal_error(e, self.redactor), self.job.run_id)
            result = self.finish(result)
            write_json_atomic(run.path / "result.json", result)
            return result
        finally:
            self.progress.flush()
            if self.publisher is not None:  # an abandoned publish stops at its next progress report
                self.publisher.join(PUBLISH_LET_GO_S)
            if self.publisher is not None and self.publisher.is_alive():
                # still in a call that reports nothing (a Hub commit, a stalled connection): the run
                # stays locked until it returns, so a resubmit cannot publish beside it
                threading.Thread(
                    target=self.release_after_publisher, args=(run,), name="ftw-release", daemon=True
                ).start()
            else:
                self.release(run)

    def finished_result(self) -> dict[str, Any] | None:
        """The result of this run when it completed before with the same config: a finished run is
        read-only, so any number of resubmits at once (no lock taken) all report it done."""
        path = resolve_run_dir(base_volume(self.env), self.job.run_id)
        result, previous = read_json(path / "result.json"), read_json(path / "job.json")
        if not result or result.get("status") != "completed" or not previous or not self.job.resume:
            return None
        return None if changed_keys(previous.get("config") or {}, self.public_job["config"]) else result

    def release(self, run: RunDir) -> None:
        if self.uploader is not None:  # its final sweep uploads what training saved last
            self.uploader.stop()
        run.close()

    def release_after_publisher(self, run: RunDir) -> None:
        assert self.publisher is not None
        self.publisher.join()
        self.release(run)

    def run_stages(self, run: RunDir) -> dict[str, Any]:
        config_path = self.write_config(run)
        if not run.stage_done("train"):
            self.template = template.shared(child_env(self.env, {}, {}))  # imports while the checks run
            with self.step("checks", "checking disk and GPU"):
                estimate, shape = estimate_disk(self.job.config, self.env)
                disk = check_disk(estimate, run.base)
                self.prediction = predict(self.job.config, shape, self.env, max(self.visible_count(), 1))
                self.probe_gpu(self.prediction.weights_bytes if self.prediction else 0)
                memory = check_fits(self.prediction, self.gpu_probe.devices, self.job.allow_oom_risk)
                if memory.get("warning"):
                    self.warnings.append({"loc": "config", "msg": memory["warning"]})
                check_machine(
                    self.job.config,
                    self.gpu_probe.count > 0,
                    self.stage_env(run),
                    datasets=not run.stage_done("preprocess"),
                )
                write_json_atomic(
                    run.path / "checks.json",
                    self.redactor.data({"disk": disk, "gpu": self.gpu_probe.as_dict(), "memory": memory}),
                )
        cache_dir = self.preprocess(run, config_path)
        metrics = self.train(run, config_path, cache_dir)
        artifacts = self.publish(run)
        metrics = {**metrics, **run_metrics(self.prediction, self.gpu_probe, metrics, time.monotonic() - self.started)}
        return {
            "run_id": self.job.run_id,
            "status": "completed",
            "artifacts": artifacts,
            "metrics": metrics,
            "run_dir": str(run.path),
            "warnings": self.warnings,
        }

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        result["timings"] = {**self.timings, "total_s": round(time.monotonic() - self.started, 3)}
        return self.redactor.data(result)

    def preprocess(self, run: RunDir, config_path: Path) -> Path:
        done = run.stage_done("preprocess")
        if done and children.read_manifest(Path(done["cache_dir"])):
            self.progress(stage_update(self.job.run_id, "preprocess", "prepared data found from an earlier attempt"))
            return Path(done["cache_dir"])
        with self.step("preprocess", "preparing the datasets"):
            child = self.supervise(
                run, "preprocess", children.preprocess_argv(config_path), self.job.limits.preprocess_s
            )
            try:
                cache_dir, summary = children.prepared_cache(child.last_stdout_line())
            except FtwError as e:
                e.log_tail = child.log_tail()
                raise
        run.mark_done("preprocess", {"cache_dir": str(cache_dir), "summary": summary})
        return cache_dir

    def train(self, run: RunDir, config_path: Path, cache_dir: Path) -> dict[str, Any]:
        cfg = self.job.config
        done = run.stage_done("train")
        if done:
            self.progress(stage_update(self.job.run_id, "train", "training finished in an earlier attempt"))
            return done["metrics"]
        with self.step("train", "fine-tuning"):
            resume_from = self.restore_checkpoint(run)
            argv = children.train_argv(config_path, run.path, cache_dir, self.gpu_count)
            from worker.publish import start_uploader

            self.uploader = start_uploader(run.path, self.job, self.stage_env(run))
            try:
                self.supervise(run, "train", argv, self.job.limits.train_s)
            except (
                FtwError
            ) as e:  # run() stops the uploader: a preempted run's last checkpoint still reaches the bucket
                e.details["checkpoint_step"] = children.newest_checkpoint(run.path)
                raise
            outputs = children.training_outputs(run.path, cfg.is_full_finetune(), cfg.merge_lora)
        if resume_from is not None:
            outputs["metrics"]["resumed_from_step"] = resume_from
        run.mark_done("train", outputs)
        return outputs["metrics"]

    def restore_checkpoint(self, run: RunDir) -> int | None:
        """The step training resumes from: the newest checkpoint on the volume, or the published one
        brought back from the bucket when it is newer (a new worker, a lost volume)."""
        if self.job.resume:
            from worker.publish import restore_checkpoint

            try:
                if restore_checkpoint(run.path, self.job, self.stage_env(run)) is not None:
                    self.progress(stage_update(self.job.run_id, "train", "restored the newest published checkpoint"))
            except PublishError as e:
                if e.retryable:  # a passing fault: the resubmit restores it (prepared data is cached)
                    raise
                # e.g. no s3:ListBucket permission: publishing may still work, so train from what the volume has
                self.warnings.append(
                    {
                        "loc": "outputs.s3",
                        "msg": f"could not look for a published checkpoint to resume from: {e.message}",
                    }
                )
        step = children.newest_checkpoint(run.path)
        if step is not None:
            self.progress(stage_update(self.job.run_id, "train", f"resuming from checkpoint-{step}"))
        return step

    def publish(self, run: RunDir) -> list[dict[str, Any]]:
        done = run.stage_done("publish")
        if done:
            return done["artifacts"]
        with self.step("publish", "publishing"):
            artifacts = self.publish_within_limit(run)
        run.mark_done("publish", {"artifacts": artifacts})
        return artifacts

    def publish_within_limit(self, run: RunDir) -> list[dict[str, Any]]:
        """publish_run in a thread, so that limits.publish_s and a cancel end the stage on time; the
        abandoned upload stops at its next progress report (the sink raises)."""
        from worker.publish import publish_run

        abandoned = threading.Event()
        outcome: dict[str, Any] = {}

        def report(event: dict[str, Any]) -> None:
            if abandoned.is_set():
                raise PublishError("publishing was abandoned", "see the job's error", stage="publish")
            self.progress(event_update(self.job.run_id, "publish", event))

        def work() -> None:
            try:
                outcome["artifacts"] = publish_run(
                    run.path, self.job, self.stage_env(run), self.uploader, progress=report
                )
            except BaseException as e:  # handed to the job's thread below
                outcome["error"] = e

        publisher = self.publisher = threading.Thread(target=work, name="ftw-publish", daemon=True)
        publisher.start()
        limit = self.job.limits.publish_s
        deadline = time.monotonic() + limit if limit else float("inf")
        while publisher.is_alive():
            publisher.join(min(0.1, max(0.0, deadline - time.monotonic())))
            if publisher.is_alive() and (self.stop.is_set() or time.monotonic() > deadline):
                abandoned.set()
                self.check_stop("while publishing (training is done and kept)")
                raise PublishError(
                    f"publishing did not finish within limits.publish_s = {limit:g} s",
                    "raise limits.publish_s (large artifacts or a slow target), then resubmit the same run_id: training is not redone",
                    stage="publish",
                )
        error = outcome.get("error")
        if isinstance(error, FtwError):
            raise error
        if error is not None:
            raise PublishError(
                f"publishing failed: {type(error).__name__}: {error}",
                "resubmit the same run_id: training is not redone",
                stage="publish",
            ) from error
        return outcome["artifacts"]

    # ---- the checks before any work ------------------------------------------------------------
    def check_resumable(self, run: RunDir) -> None:
        """A run_id seen before continues only with the same training config (and resume: true)."""
        previous = read_json(run.path / "job.json")
        if previous is None:
            return
        if not self.job.resume and run.state.get("stages"):
            raise JobSpecError(
                f"run {self.job.run_id!r} already has results and the job says resume: false",
                "submit with resume: true to continue it, or with a new run_id to start over (nothing is deleted)",
                stage="run_dir",
            )
        old, new = previous.get("config") or {}, self.public_job["config"]
        changed = changed_keys(old, new)
        if changed:
            raise JobSpecError(
                f"run {self.job.run_id!r} exists with a different training config (changed: {', '.join(changed)})",
                "resubmit the original config to resume it, or use a new run_id for the new config",
                stage="run_dir",
                details={"changed_keys": changed},
            )

    @functools.cached_property
    def job_dict(self) -> dict[str, Any]:
        """The job as written to disk, before redaction (dumped once: a config may be megabytes)."""
        return self.job.public_dict()

    @functools.cached_property
    def public_job(self) -> dict[str, Any]:
        """job.json's content: the job without credentials, every secret masked (redacted once)."""
        return self.redactor.data(self.job_dict)

    def write_config(self, run: RunDir) -> Path:
        """config.json for the children (output_dir pinned inside the run folder) and job.json, both
        secret-free; what was masked in the config (a presigned URL) reaches the children in their environment."""
        public = self.public_job
        self.config_secrets = masked_values(self.job_dict["config"], public["config"])
        if len(json.dumps(self.config_secrets)) > MAX_ENV_VALUE:
            raise JobSpecError(
                f"config values holding a URL password or signature add up to over {MAX_ENV_VALUE // 1024} KB",
                "keep such values to the URLs themselves (a presigned URL is well under 4 KB)",
                stage="run_dir",
            )
        write_json_atomic(run.path / "job.json", public)
        config = {**public["config"], "output_dir": str(run.path)}
        path = run.path / "config.json"
        write_json_atomic(path, config)
        return path

    def visible_count(self) -> int:
        wanted = gpu.parse_visible_devices(self.env.get("CUDA_VISIBLE_DEVICES"))
        return len(wanted) if wanted else 1

    def probe_gpu(self, need_bytes: int) -> None:
        self.gpu_probe = gpu.probe(self.env, need_bytes, gpu.cpu_allowed(self.env, self.job.allow_cpu))
        self.gpu_env = gpu.stage_env(self.gpu_probe, self.env)
        self.gpu_count = self.gpu_probe.count
        found = (
            "CPU only"
            if self.gpu_probe.cpu_only
            else ", ".join(f"{d.name} ({d.free_mib} MiB free)" for d in self.gpu_probe.devices)
        )
        self.progress(stage_update(self.job.run_id, "checks", f"devices: {found}"))

    # ---- running children ----------------------------------------------------------------------
    def stage_env(self, run: RunDir) -> dict[str, str]:
        extra = {**self.gpu_env, "BASE_VOLUME": str(run.base)}
        if self.config_secrets:
            extra[CONFIG_SECRETS_ENV] = json.dumps(self.config_secrets)
        return child_env(self.env, self.credentials, extra)

    def supervise(self, run: RunDir, name: str, argv: list[str], limit_s: float | None) -> StageRun:
        self.check_stop()
        stage = Stage(
            name,
            argv,
            self.stage_env(run),
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
        if event.get("event") == "first_step" and isinstance(event.get("ts"), (int, float)):  # what a user waits for
            self.timings.setdefault("first_step_s", round(max(event["ts"] - self.started_wall, 0.0), 3))
        self.progress(event_update(self.job.run_id, stage, event))

    def check_stop(self, during: str = "before its next stage started") -> None:
        if self.stop.is_set():
            reason = self.stop.reason or "cancelled"
            cls = STOP_ERRORS.get(reason, Cancelled)
            raise cls(f"the job was {reason} {during}", "submit it again with the same run_id to continue")

    @contextlib.contextmanager
    def step(self, name: str, message: str) -> Iterator[None]:
        self.check_stop()
        self.progress(stage_update(self.job.run_id, name, message))
        started = time.monotonic()
        try:
            yield
        except FtwError as e:
            e.stage = e.stage or name
            raise
        finally:
            self.timings[f"{name}_s"] = round(time.monotonic() - started, 3)

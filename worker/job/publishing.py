"""A job's publish side, one object per job: resume insurance while training runs (the newest
published checkpoint brought back, the checkpoint uploader), then the artifacts to the job's targets
within limits.publish_s. `ftw train` has none: its results stay in the run folder."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.job import JobInput
from worker.errors import FtwError, PublishError
from worker.job.supervisor import StopSignal
from worker.job.updates import ProgressSink, event_update, stage_update
from worker.publish import CheckpointUploader, PublishPlan, publish_run, restore_checkpoint, start_uploader

LET_GO_S = 30.0  # how long the job waits for an abandoned publish to stop (the run stays locked until it has)


class Publishing:
    def __init__(
        self,
        job: JobInput,
        plan: PublishPlan,
        progress: ProgressSink,
        stop: StopSignal,
        warnings: list[dict[str, str]],
    ):
        self.job, self.plan, self.progress, self.stop, self.warnings = job, plan, progress, stop, warnings
        self.uploader: CheckpointUploader | None = None  # checkpoints to the bucket while and after training
        self.publisher: threading.Thread | None = None  # publish_run, when it ran

    def restore_checkpoint(self, run_path: Path) -> None:
        """The published checkpoint brought back from the bucket when it is newer than the volume's
        (a new worker, a lost volume)."""
        if not self.job.resume:
            return
        try:
            if restore_checkpoint(run_path, self.plan) is not None:
                self.progress(stage_update(self.job.run_id, "train", "restored the newest published checkpoint"))
        except PublishError as e:
            if e.retryable:  # a passing fault: the resubmit restores it (prepared data is cached)
                raise
            # e.g. no s3:ListBucket permission: publishing may still work, so train from what the volume has
            self.warnings.append(
                {"loc": "outputs.s3", "msg": f"could not look for a published checkpoint to resume from: {e.message}"}
            )

    def start_uploader(self, run_path: Path) -> None:
        self.uploader = start_uploader(run_path, self.plan)

    def publish(self, run_path: Path) -> list[dict[str, Any]]:
        """publish_run in a thread, so that limits.publish_s and a cancel end the stage on time; the
        abandoned upload stops at its next progress report (the sink raises)."""
        abandoned = threading.Event()
        outcome: dict[str, Any] = {}

        def report(event: dict[str, Any]) -> None:
            if abandoned.is_set():
                raise PublishError("publishing was abandoned", "see the job's error", stage="publish")
            self.progress(event_update(self.job.run_id, "publish", event))

        def work() -> None:
            try:
                outcome["artifacts"] = publish_run(run_path, self.plan, self.uploader, progress=report)
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
                self.stop.check("while publishing (training is done and kept)")
                raise PublishError(
                    f"publishing did not finish within limits.publish_s = {limit:g} s",
                    "raise limits.publish_s (large artifacts or a slow target), then resubmit the same run_id: "
                    "training is not redone",
                    stage="publish",
                )
        return published(outcome)

    def let_go(self, release: Callable[[], None]) -> None:
        """Stop the uploader (its final sweep uploads what training saved last) and call `release` once
        no publish is running: one stuck in a call that reports nothing (a Hub commit, a stalled
        connection) keeps the run locked until it returns, so a resubmit cannot publish beside it."""
        if self.publisher is not None:  # an abandoned publish stops at its next progress report
            self.publisher.join(LET_GO_S)

        def after_publisher() -> None:
            if self.publisher is not None:
                self.publisher.join()
            if self.uploader is not None:
                self.uploader.stop()
            release()

        if self.publisher is not None and self.publisher.is_alive():
            threading.Thread(target=after_publisher, name="ftw-release", daemon=True).start()
        else:
            after_publisher()


def published(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    error = outcome.get("error")
    if isinstance(error, FtwError):
        raise error
    if error is not None:
        raise PublishError(
            f"publishing failed: {type(error).__name__}: {error}",
            "resubmit the same run_id: training is not redone",
            stage="publish",
        ) from error
    artifacts: list[dict[str, Any]] = outcome["artifacts"]
    return artifacts

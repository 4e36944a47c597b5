"""The error taxonomy of a job, written down before the code that raises it (torchelastic-style).

Every failure a user can hit ends as one of these, carried to the caller as one result shape
(`FtwError.as_result`): a machine-readable code, a message, a hint that says what to change,
whether a retry can help, and the log tail where a child process failed.
"""

from __future__ import annotations

from typing import Any, Literal

# how a command ended; worker/cli.py maps each to its exit code (the one place)
Outcome = Literal["ok", "failed", "usage", "invalid", "stopped", "interrupted"]


class FtwError(Exception):
    code = "error"
    retryable = False

    def __init__(
        self,
        message: str,
        hint: str = "",
        *,
        stage: str = "",
        log_tail: str = "",
        details: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.stage = stage
        self.log_tail = log_tail
        self.details = details or {}

    def as_result(self, run_id: str | None = None) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "status": "failed",
            "error": {
                "code": self.code,
                "stage": self.stage,
                "message": self.message,
                "hint": self.hint,
                "retryable": self.retryable,
                "log_tail": self.log_tail,
                **({"details": self.details} if self.details else {}),
            },
        }


class JobSpecError(FtwError):
    """The job or its config is invalid: nothing was started."""

    code = "invalid_job"


class DataError(FtwError):
    """The data cannot be read or turned into training rows (file, row and field named)."""

    code = "data"


class ModelError(FtwError):
    """The base model or tokenizer cannot be loaded as configured."""

    code = "model"


class TrainingError(FtwError):
    code = "training_failed"


class OutOfMemory(TrainingError):
    code = "oom"


class DistributedError(TrainingError):
    code = "nccl"
    retryable = True


class StageTimeout(FtwError):
    code = "timeout"


class NoProgress(StageTimeout):
    code = "no_progress"


class Cancelled(FtwError):
    code = "cancelled"


class Preempted(FtwError):
    """SIGTERM from the platform: a checkpoint was saved; the same run_id resumes."""

    code = "preempted"
    retryable = True


class ChildCrash(FtwError):
    """A stage's process died without a typed error (signal, segfault, kill -9)."""

    code = "crash"
    retryable = True


class PublishError(FtwError):
    code = "publish"
    retryable = True


class InfraError(FtwError):
    """The machine cannot run the job: volume, disk space, GPU, driver."""

    code = "infra"


class PredictedOutOfMemory(InfraError):
    """The estimate's peak memory exceeds the probed GPU's free memory (job allow_oom_risk: false)."""

    code = "predicted_oom"


class StageMissing(FtwError):
    """A pipeline stage is not available in this build."""

    code = "not_implemented"


class ServeError(FtwError):
    """A serving request cannot be answered as sent; `status` is the HTTP status it maps to."""

    code = "bad_request"

    def __init__(self, message: str, hint: str = "", *, status: int = 400, error_code: str | None = None, **kw: Any):
        super().__init__(message, hint, stage="serve", **kw)
        self.status = status
        self.error_code = error_code  # OpenAI's machine-readable code (e.g. model_not_found); else the status


class AdapterError(ServeError):
    """An adapter named by a request cannot be pulled, verified or loaded (only its requests fail)."""

    code = "adapter"


class RunInUse(FtwError):
    """Another job holds the same run_id's folder right now (the second job fails, never shares)."""

    code = "run_in_use"
    retryable = True

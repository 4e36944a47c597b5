"""The failure shapes of a job's result: an invalid job, a typed FtwError, a bug in ftw."""

from __future__ import annotations

import sys
import traceback
from typing import Any

from schemas.issues import Report
from schemas.job import check_run_id
from schemas.secrets import Redactor
from worker.errors import FtwError, JobSpecError

SHOWN_PROBLEMS = 10  # in the failure message of an invalid job; details.errors has them all (at most 100)
STATUS_BY_CODE = {"cancelled": "cancelled", "preempted": "preempted"}


def invalid_job(report: Report) -> JobSpecError:
    """Every problem of an invalid job in one error, before anything started."""
    problems = "; ".join(str(i) for i in report.errors[:SHOWN_PROBLEMS])
    if len(report.errors) > SHOWN_PROBLEMS:
        problems += f"; and {len(report.errors) - SHOWN_PROBLEMS} more (details.errors)"
    return JobSpecError(
        f"the job is invalid ({len(report.errors)} problem(s)): {problems}",
        "fix every problem listed (the same list as `ftw validate JOB.json`); nothing was started",
        stage="validate",
        details={
            "errors": [i.as_dict() for i in report.errors],
            "warnings": [i.as_dict() for i in report.warnings],
        },
    )


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

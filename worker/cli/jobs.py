"""The bodies of `ftw train` and `ftw run`: a job through worker.job.pipeline, progress to stderr,
the result on stdout's last line."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

from worker.errors import Outcome
from worker.job.supervisor import StopSignal

# the stages whose refusals mean "change the config, the job or the run folder"
INVALID_STAGES = ("validate", "run_dir", "checks")


def train_file(config: Path, run_dir: Path | None, nproc: int | None) -> Outcome:
    import os

    from schemas.paths import base_volume, resolve_local_path
    from worker.documents import config_from_file
    from worker.job.local_training import train_config
    from worker.job.pipeline import LocalTraining

    cfg, outcome = config_from_file(config, "ftw train", honours=frozenset({"output_dir"}))
    if cfg is None:
        return outcome
    if run_dir is None:
        run_dir = resolve_local_path(cfg.output_dir, os.environ) if cfg.output_dir else None
    if run_dir is None:
        run_dir = base_volume(os.environ) / "runs" / config.stem
    print(f"ftw train: run folder {run_dir.expanduser().resolve()}", file=sys.stderr)
    trained = train_config(cfg, LocalTraining(run_dir, nproc), on_progress=show, stop=stop_on_signals())
    if trained.finished_before and trained.summary is not None:
        print(
            f"ftw train: {trained.run_dir} already finished this config ({trained.summary.steps} steps); "
            "nothing was redone. To train it again, pass --run-dir with a new folder",
            file=sys.stderr,
        )
    for warning in trained.result.get("warnings") or []:
        print(f"warning {warning.get('loc')}: {warning.get('msg')}", file=sys.stderr)
    if trained.summary is None:
        return train_failed(trained.result)
    print(json.dumps(trained.summary.line(trained.run_dir)), flush=True)
    return "ok"


def run_file(path: Path, run_id: str | None, quiet: bool) -> Outcome:
    from worker.documents import read_document
    from worker.job.pipeline import run_job

    doc, readable = read_document(path, "ftw run")
    if not readable:  # unreadable or not YAML/JSON: a usage error, before anything runs
        return "usage"
    if run_id and isinstance(doc, dict):
        inner = doc["input"] if isinstance(doc.get("input"), dict) else doc
        inner["run_id"] = run_id
    result = run_job(doc, on_progress=None if quiet else show, stop=stop_on_signals())
    if result.get("status") != "completed" and not quiet:
        explain("ftw run", result)
    print(json.dumps(result, default=str), flush=True)
    return "ok" if result.get("status") == "completed" else "failed"


# ---- shared by the job commands ------------------------------------------------------------------
def show(update: dict[str, Any]) -> None:
    from worker.job.updates import format_line

    print(format_line(update), file=sys.stderr, flush=True)


def stop_on_signals() -> StopSignal:
    """SIGTERM stops the job as a preemption, Ctrl-C as a cancellation: the running child saves first."""
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: stop.request("preempted"))
    signal.signal(signal.SIGINT, lambda *_: stop.request("cancelled"))
    return stop


def explain(prog: str, result: dict[str, Any]) -> None:
    """Say once on stderr why a job did not complete, and what to change."""
    error = result.get("error") or {}
    print(f"{prog}: {result.get('status')}: [{error.get('code')}] {error.get('message')}", file=sys.stderr)
    if error.get("hint"):
        print(f"hint: {error['hint']}", file=sys.stderr)


def train_failed(result: dict[str, Any]) -> Outcome:
    """How ftw train ended when training did not finish: stopped (saved), refused (invalid), else failed."""
    if result.get("status") in ("preempted", "cancelled"):
        print("ftw train: stopped after saving a checkpoint; run the same command again to resume", file=sys.stderr)
        return "stopped"
    explain("ftw train", result)
    error = result.get("error") or {}
    refused = error.get("code") == "invalid_job" and error.get("stage") in INVALID_STAGES
    return "invalid" if refused else "failed"

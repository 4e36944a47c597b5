"""`ftw run JOB.json` — one job through the same pipeline as handler.py, on this machine.

Progress goes to stderr, one line per update; the result (or failure) JSON is the LAST line of
stdout. Exit 0 when the job completed, 1 when it failed, 2 on usage errors. SIGTERM stops the job
as a preemption (the training child saves a checkpoint first), Ctrl-C as a cancellation; either
way the same run_id resumes. JOB.json is a job (`{"input": {...}}` or the bare input, YAML too).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from worker.job.pipeline import run_job
from worker.job.supervisor import StopSignal
from worker.job.updates import format_line
from worker.validate_cli import read_document

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftw run", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="job JSON/YAML file")
    parser.add_argument("--run-id", help="override the job's run_id")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    doc, readable = read_document(args.job, "ftw run")
    if not readable:  # unreadable or not YAML/JSON: a usage error, before anything runs
        return EXIT_USAGE
    if args.run_id and isinstance(doc, dict):
        inner = doc["input"] if isinstance(doc.get("input"), dict) else doc
        inner["run_id"] = args.run_id

    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: stop.request("preempted"))
    signal.signal(signal.SIGINT, lambda *_: stop.request("cancelled"))

    def show(update: dict) -> None:
        if not args.quiet:
            print(format_line(update), file=sys.stderr, flush=True)

    result = run_job(doc, on_progress=show, stop=stop)
    if result.get("status") != "completed" and not args.quiet:
        error = result.get("error") or {}
        print(f"ftw run: {result.get('status')}: [{error.get('code')}] {error.get('message')}", file=sys.stderr)
        if error.get("hint"):
            print(f"hint: {error['hint']}", file=sys.stderr)
    print(json.dumps(result, default=str), flush=True)
    return EXIT_OK if result.get("status") == "completed" else EXIT_FAILED

"""`ftw` — the one command: every subcommand's arguments, and what each outcome exits with.

    ftw validate PATH [--json]      check a config or job; exit 0 valid, 3 invalid, 2 usage
    ftw preprocess CONFIG           prepare (tokenise, pack, cache) the datasets of a config
    ftw train CONFIG                preprocess if needed, then fine-tune (the job path, in a run folder)
    ftw run JOB.json                one job through the same pipeline as handler.py
    ftw estimate CONFIG_OR_JOB      peak memory, speed, time and cost on each RunPod GPU type
    ftw endpoint                    local RunPod-compatible endpoint (queue + API)
    ftw submit|status|stream|cancel talk to an endpoint (RunPod or local) with the runpod client
    ftw pull RUN_ID|URI DIR         fetch a published adapter, verified against its manifest
    ftw serve                       serve a base model + adapters over HTTP

Command bodies are plain functions in their packages, imported only when their command runs, so
`ftw validate` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3, 75
# the stages whose refusals mean "change the config, the job or the run folder" (exit 3)
INVALID_STAGES = ("validate", "run_dir", "checks")
# subcommands whose parser still lives beside their body (moving them here is issue 14's next step)
DELEGATED = {
    "validate": "worker.validate_cli",
    "preprocess": "worker.data.cli",
    "estimate": "worker.estimate.cli",
    "endpoint": "worker.devtools.endpoint.cli",
    "submit": "worker.devtools.endpoint.client_cli",
    "status": "worker.devtools.endpoint.client_cli",
    "stream": "worker.devtools.endpoint.client_cli",
    "cancel": "worker.devtools.endpoint.client_cli",
    "pull": "worker.publish.cli",
    "serve": "worker.serve.cli",
}
USAGE = __doc__.split("\n\n")[1]


# ---- ftw train ---------------------------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftw train",
        description="Preprocess (cache hit or build), then fine-tune: the job path with a config instead of a "
        "job. The run folder is --run-dir, else output_dir (relative: under BASE_VOLUME), else "
        "BASE_VOLUME/runs/<config file name>; one holding another config's training is refused, one "
        "finished with this config is reported as done. Exit 0 done, 1 failed, 2 usage, 3 invalid config "
        "or run folder, 75 stopped (saved; run the same command again to resume).",
    )
    parser.add_argument("config", type=Path, help="axolotl-style training config (YAML or JSON)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="run folder (default: output_dir, relative under BASE_VOLUME; else BASE_VOLUME/runs/<config name>)",
    )
    parser.add_argument("--nproc", type=int, help="processes (one per GPU); default: the visible GPUs")
    return parser


def train(args: argparse.Namespace) -> int:
    import os

    from schemas.paths import base_volume, resolve_local_path
    from worker.job.pipeline import LocalTraining, train_config
    from worker.validate_cli import config_from_file

    cfg, code = config_from_file(args.config, "ftw train", honours=frozenset({"output_dir"}))
    if cfg is None:
        return code
    if args.run_dir is not None:
        run_dir = args.run_dir
    elif cfg.output_dir:
        run_dir = resolve_local_path(cfg.output_dir, os.environ)
    else:
        run_dir = base_volume(os.environ) / "runs" / args.config.stem
    print(f"ftw train: run folder {run_dir.expanduser().resolve()}", file=sys.stderr)
    outcome = train_config(cfg, LocalTraining(run_dir, args.nproc), on_progress=show, stop=stop_on_signals())
    if outcome.finished_before and outcome.summary is not None:
        print(
            f"ftw train: {outcome.run_dir} already finished this config ({outcome.summary.steps} steps); "
            "nothing was redone. To train it again, pass --run-dir with a new folder",
            file=sys.stderr,
        )
    for warning in outcome.result.get("warnings") or []:
        print(f"warning {warning.get('loc')}: {warning.get('msg')}", file=sys.stderr)
    if outcome.summary is None:
        return train_failed(outcome.result)
    print(json.dumps(outcome.summary.line(outcome.run_dir)), flush=True)
    return EXIT_OK


# ---- ftw run -----------------------------------------------------------------------------------
def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftw run",
        description="One job through the same pipeline as handler.py, on this machine. Progress goes to stderr; "
        "the result (or failure) JSON is the LAST line of stdout. Exit 0 completed, 1 failed, 2 usage. SIGTERM "
        "stops the job as a preemption, Ctrl-C as a cancellation; either way the same run_id resumes.",
    )
    parser.add_argument("job", type=Path, help="job JSON/YAML file ({'input': {...}} or the bare input)")
    parser.add_argument("--run-id", help="override the job's run_id")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def run(args: argparse.Namespace) -> int:
    from worker.job.pipeline import run_job
    from worker.validate_cli import read_document

    doc, readable = read_document(args.job, "ftw run")
    if not readable:  # unreadable or not YAML/JSON: a usage error, before anything runs
        return EXIT_USAGE
    if args.run_id and isinstance(doc, dict):
        inner = doc["input"] if isinstance(doc.get("input"), dict) else doc
        inner["run_id"] = args.run_id
    result = run_job(doc, on_progress=None if args.quiet else show, stop=stop_on_signals())
    if result.get("status") != "completed" and not args.quiet:
        explain("ftw run", result)
    print(json.dumps(result, default=str), flush=True)
    return EXIT_OK if result.get("status") == "completed" else EXIT_FAILED


# ---- shared by the job commands ------------------------------------------------------------------
def show(update: dict[str, Any]) -> None:
    from worker.job.updates import format_line

    print(format_line(update), file=sys.stderr, flush=True)


def stop_on_signals() -> Any:
    """SIGTERM stops the job as a preemption, Ctrl-C as a cancellation: the running child saves first."""
    from worker.job.supervisor import StopSignal

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


def train_failed(result: dict[str, Any]) -> int:
    """ftw train's exit code when training did not finish: 75 stopped (saved), 3 refused, else 1."""
    if result.get("status") in ("preempted", "cancelled"):
        print("ftw train: stopped after saving a checkpoint; run the same command again to resume", file=sys.stderr)
        return EXIT_STOPPED
    explain("ftw train", result)
    error = result.get("error") or {}
    refused = error.get("code") == "invalid_job" and error.get("stage") in INVALID_STAGES
    return EXIT_INVALID if refused else EXIT_FAILED


COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "train": (train_parser, train),
    "run": (run_parser, run),
}


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The arguments, or the exit code of --help (0) and of a usage error (2)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ftw COMMAND [ARGS]\n\n" + USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name in COMMANDS:
        make_parser, body = COMMANDS[name]
        args = parse(make_parser(), rest)
        return args if isinstance(args, int) else body(args)
    if name not in DELEGATED:
        print(f"ftw: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    try:
        module = importlib.import_module(DELEGATED[name])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(DELEGATED[name]):
            print(f"ftw {name}: not available in this build", file=sys.stderr)
            return EXIT_USAGE
        raise
    if module.__name__.endswith("client_cli"):
        return int(module.main([name, *rest]))
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())

"""`ftw` — the one command: every subcommand's arguments (worker/cli/parsers.py), and what each
outcome exits with (here, the one place).

    ftw validate PATH [--json]      check a config or job; exit 0 valid, 3 invalid, 2 usage
    ftw preprocess CONFIG           prepare (tokenise, pack, cache) the datasets of a config
    ftw train CONFIG                preprocess if needed, then fine-tune (the job path, in a run folder)
    ftw run JOB.json                one job through the same pipeline as handler.py
    ftw estimate CONFIG_OR_JOB      peak memory, speed, time and cost on each RunPod GPU type
    ftw endpoint                    local RunPod-compatible endpoint (queue + API)
    ftw submit|status|stream|cancel talk to an endpoint (RunPod or local) with the runpod client
    ftw pull RUN_ID|URI DIR         fetch a published adapter, verified against its manifest
    ftw serve                       serve a base model + adapters over HTTP

Command bodies are plain functions in their packages returning an Outcome, imported only when
their command runs, so `ftw validate` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from worker.cli import parsers
from worker.errors import Outcome

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INVALID, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 75, 130
EXIT_CODES: dict[Outcome, int] = {
    "ok": EXIT_OK,
    "failed": EXIT_FAILED,
    "usage": EXIT_USAGE,
    "invalid": EXIT_INVALID,
    "stopped": EXIT_STOPPED,  # SIGTERM: saved first; the same command resumes
    "interrupted": EXIT_INTERRUPTED,
}
# the dev tools' subcommands: their parsing lives beside their body (worker/devtools/endpoint/)
DELEGATED = {
    "endpoint": "worker.devtools.endpoint.cli",
    "submit": "worker.devtools.endpoint.client_cli",
    "status": "worker.devtools.endpoint.client_cli",
    "stream": "worker.devtools.endpoint.client_cli",
    "cancel": "worker.devtools.endpoint.client_cli",
}
USAGE = __doc__.split("\n\n")[1]


def validate(a: argparse.Namespace) -> Outcome:
    from worker.documents import validate_file

    return validate_file(a.path, a.json)


def preprocess(a: argparse.Namespace) -> Outcome:
    from worker.data.command import preprocess_file

    return preprocess_file(a.config)


def train(a: argparse.Namespace) -> Outcome:
    from worker.cli.jobs import train_file

    return train_file(a.config, a.run_dir, a.nproc)


def run(a: argparse.Namespace) -> Outcome:
    from worker.cli.jobs import run_file

    return run_file(a.job, a.run_id, a.quiet)


def estimate(a: argparse.Namespace) -> Outcome:
    from worker.estimate.command import estimate_file

    return estimate_file(a.path, a.gpu, a.json, a.tokens, a.shape_from)


def pull(a: argparse.Namespace) -> Outcome:
    from worker.publish.command import pull_artifact

    return pull_artifact(a.source, a.dest, a.kind, a.json)


def serve(a: argparse.Namespace) -> Outcome:
    from worker.serve.httpserver import serve_http

    return serve_http(a.model, a.engine, a.python, a.host, a.port)


Command = tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], Outcome]]
COMMANDS: dict[str, Command] = {
    "validate": (parsers.validate, validate),
    "preprocess": (parsers.preprocess, preprocess),
    "train": (parsers.train, train),
    "run": (parsers.run, run),
    "estimate": (parsers.estimate, estimate),
    "pull": (parsers.pull, pull),
    "serve": (parsers.serve, serve),
}


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The arguments, or the exit code of --help (0) and of a usage error (2)."""
    try:
        return parser.parse_intermixed_args(argv)  # options before or after the positionals
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
        return args if isinstance(args, int) else EXIT_CODES[body(args)]
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

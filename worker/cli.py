"""`ftw` — one command, one module per subcommand, imported only when called.

    ftw validate PATH [--json]      check a config or job; exit 0 valid, 3 invalid, 2 usage
    ftw preprocess CONFIG           prepare (tokenise, pack, cache) the datasets of a config
    ftw train CONFIG                preprocess if needed, then fine-tune
    ftw run JOB.json                one job through the same pipeline as handler.py
    ftw estimate CONFIG_OR_JOB      peak memory, speed, time and cost on each RunPod GPU type
    ftw endpoint                    local RunPod-compatible endpoint (queue + API)
    ftw submit|status|stream|cancel talk to an endpoint (RunPod or local) with the runpod client
    ftw pull RUN_ID|URI DIR         fetch a published adapter, verified against its manifest
    ftw serve                       serve a base model + adapters over HTTP

Each subcommand module exposes `main(argv: list[str]) -> int`; nothing heavy is imported here.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "validate": "worker.validate_cli",
    "preprocess": "worker.data.cli",
    "train": "worker.train.cli",
    "run": "worker.job.cli",
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ftw COMMAND [ARGS]\n\n" + USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ftw: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(COMMANDS[name]):
            print(f"ftw {name}: not available in this build", file=sys.stderr)
            return 2
        raise
    if module.__name__.endswith("client_cli"):
        return module.main([name, *rest])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())

"""Every `ftw` subcommand's arguments, in one place (the bodies are plain functions in their packages)."""

from __future__ import annotations

import argparse
from pathlib import Path

TRAIN = (
    "Preprocess (cache hit or build), then fine-tune: the job path with a config instead of a job. The run "
    "folder is --run-dir, else output_dir (relative: under BASE_VOLUME), else BASE_VOLUME/runs/<config file "
    "name>; one holding another config's training is refused, one finished with this config is reported as "
    "done. Exit 0 done, 1 failed, 2 usage, 3 invalid config or run folder, 75 stopped (saved; run the same "
    "command again to resume)."
)
RUN = (
    "One job through the same pipeline as handler.py, on this machine. Progress goes to stderr; the result "
    "(or failure) JSON is the LAST line of stdout. Exit 0 completed, 1 failed, 2 usage. SIGTERM stops the job "
    "as a preemption, Ctrl-C as a cancellation; either way the same run_id resumes."
)
PULL = """A published artifact, verified.

SOURCE is a run id (the local store, else the bucket in BUCKET_NAME), s3://bucket/prefix/…,
hf://org/name@revision (or org/name@revision) or a local folder. With DIR the artifact is copied
there (DIR absent or empty; a DIR that already holds exactly this artifact is left as it is, so a
repeated pull succeeds). Without DIR nothing is copied: a remote artifact stays in the cache
(BASE_VOLUME/cache/adapters/<manifest sha256>), a local one where it is; either way the verified
folder's path is printed. Exit 0 done, 1 failed (the message says what to change), 2 usage error,
130 interrupted (Ctrl-C or SIGTERM: a partial download is removed, DIR is left as it was)."""


def validate() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftw validate",
        description="A training config (YAML/JSON) or a job JSON, every problem at once. "
        "Exit 0 valid (warnings allowed), 3 invalid, 2 usage error (unreadable file, bad YAML/JSON).",
    )
    parser.add_argument("path", type=Path, help="training config (.yml/.yaml/.json) or job JSON")
    parser.add_argument("--json", action="store_true", help='print {"valid", "errors": [{"loc", "msg"}], "warnings"}')
    return parser


def preprocess() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftw preprocess",
        description="Prepare (tokenise, mask, pack, cache) the datasets of a training config. Exit 0 done, "
        "1 the data cannot be prepared, 2 usage error, 3 invalid config.",
    )
    parser.add_argument("config", type=Path, help="training config, YAML or JSON")
    return parser


def train() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftw train", description=TRAIN)
    parser.add_argument("config", type=Path, help="axolotl-style training config (YAML or JSON)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="run folder (default: output_dir, relative under BASE_VOLUME; else BASE_VOLUME/runs/<config name>)",
    )
    parser.add_argument("--nproc", type=int, help="processes (one per GPU); default: the visible GPUs")
    return parser


def run() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftw run", description=RUN)
    parser.add_argument("job", type=Path, help="job JSON/YAML file ({'input': {...}} or the bare input)")
    parser.add_argument("--run-id", help="override the job's run_id")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def estimate() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftw estimate",
        description="Peak GPU memory, tokens/s, whole-run time and cost of a config or job on each RunPod "
        "serverless GPU type, before paying for it (docs/estimate.md). Exit 0 with an estimate, 2 usage error "
        "(unreadable file, unknown GPU type, unknown model shape), 3 invalid config or job.",
    )
    parser.add_argument("path", type=Path, help="training config or job (YAML or JSON)")
    parser.add_argument("--gpu", help='only this GPU type, e.g. "NVIDIA H200"')
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--tokens", type=int, help="training tokens of the data (when it cannot be read here)")
    parser.add_argument(
        "--shape-from", type=Path, help="a folder with the model's config.json (when base_model is not known here)"
    )
    return parser


def pull() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftw pull", description=PULL, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="run id, s3://…, hf://org/name@revision, org/name@revision or a local folder")
    parser.add_argument(
        "dest",
        nargs="?",
        type=Path,
        metavar="DIR",
        help="copy the artifact into this folder (default: none; the cached or local folder's path is printed)",
    )
    parser.add_argument("--kind", default="adapter", choices=["adapter", "merged", "model", "logs"])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return parser


def serve() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftw serve",
        description="The serving worker behind a local HTTP server (the same engine and requests as "
        "serve_handler.py); routes and settings: worker/serve/httpserver.py. Exit 0 stopped, 1 failed.",
    )
    parser.add_argument("--model", help="base model (Hub id or folder); default: MODEL_NAME")
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], help="default: FTW_SERVE_ENGINE or auto")
    parser.add_argument(
        "--python", help="Python of the engine child (e.g. .venv-vllm/bin/python); default: FTW_SERVE_PYTHON"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    return parser

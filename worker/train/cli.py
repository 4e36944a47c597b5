"""`ftw train CONFIG [--run-dir DIR] [--nproc N]`: validate, preprocess (cache hit or build), train.

The same children the orchestrator runs (docs/contracts.md), started from a terminal: the
preprocess child (`python -m worker.data`, which reuses a complete cache with the same
fingerprint), then the train child — under torchrun when more than one GPU is visible or --nproc
says so. The run folder is --run-dir, else the config's output_dir (relative: under BASE_VOLUME,
as every relative path of a config), else BASE_VOLUME/runs/<config file name>. A folder that
holds training of another config is refused before any work; one that finished with this config
is reported as done. Exit codes: 0 done, 1 failed, 2 usage, 3 invalid config or run folder,
75 stopped by SIGTERM (saved; run the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from schemas.paths import base_volume, resolve_local_path
from worker.errors import FtwError, JobSpecError
from worker.events import EXIT_FAILED, EXIT_PREEMPTED, read_error
from worker.job.rundir import changed_keys, read_json
from worker.preflight import check_machine
from worker.validate_cli import EXIT_INVALID, EXIT_USAGE, config_from_file

# what a run folder holds once training has saved anything: a config change there is refused
TRAINING_RESULTS = ("checkpoints", "adapter", "model", "summary.json")
SUMMARY_KEYS = ("steps", "final_loss", "tokens_per_s", "runtime_s", "artifacts")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def run_dir_for(config_path: Path, output_dir: str | None, explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit.expanduser().resolve()
    if output_dir:
        return resolve_local_path(output_dir, os.environ)
    return base_volume(os.environ) / "runs" / config_path.stem


def check_run_folder(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The finished run's summary when `run_dir` already holds this config's finished training;
    None when training may start or resume there; JobSpecError when it holds another config's
    training (the same rule as a job's run_id: worker.job.pipeline.check_resumable)."""
    if not any((run_dir / name).exists() for name in TRAINING_RESULTS):
        return None
    old = read_json(run_dir / "config.json")
    if old is None:
        raise JobSpecError(
            f"run folder {run_dir} holds training results but no readable config.json, so ftw cannot tell whether they come from this config",
            "pass --run-dir with a new folder for this config (nothing is deleted)",
            stage="run_dir",
        )
    changed = changed_keys(training_keys(old), training_keys(config))
    if changed:
        raise JobSpecError(
            f"run folder {run_dir} holds training of a different config (changed: {', '.join(changed)})",
            "pass --run-dir with a new folder (or set output_dir) for this config, or train the original config to resume it; nothing was started or deleted",
            stage="run_dir",
            details={"changed_keys": changed},
        )
    return read_json(run_dir / "summary.json")


def training_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The config without output_dir, which names the run folder rather than the training."""
    return {k: v for k, v in config.items() if k != "output_dir"}


def preprocess(config_json: Path) -> Path | int:
    """The prepared cache folder, or the preprocess child's exit code when it failed."""
    from worker.job.children import prepared_cache, preprocess_argv

    proc = subprocess.run(preprocess_argv(config_json), stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    for line in lines[:-1]:
        print(line)
    if proc.returncode != 0:
        return proc.returncode
    cache_dir, _ = prepared_cache(lines[-1] if lines else "")
    return cache_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftw train", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="axolotl-style training config (YAML or JSON)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="run folder (default: output_dir, relative under BASE_VOLUME; else BASE_VOLUME/runs/<config name>)",
    )
    parser.add_argument("--nproc", type=int, help="processes (one per GPU); default: the visible GPUs")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    cfg, code = config_from_file(args.config, "ftw train", honours=frozenset({"output_dir"}))
    if cfg is None:
        return code
    from worker.job.children import train_argv

    run_dir = run_dir_for(args.config, cfg.output_dir, args.run_dir)
    config = {**cfg.model_dump(mode="json"), "output_dir": str(run_dir)}
    try:
        done = check_run_folder(run_dir, config)
        check_machine(cfg, visible_gpus() > 0, os.environ)  # before preprocessing, as a job's checks step
    except FtwError as e:
        return _report(e, EXIT_INVALID)
    if done is not None:
        print(
            f"ftw train: {run_dir} already finished this config ({done['steps']} steps); nothing was redone. "
            "To train it again, pass --run-dir with a new folder",
            file=sys.stderr,
        )
        return _print_result(run_dir, done)
    print(f"ftw train: run folder {run_dir}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = run_dir / "config.json"
    config_json.write_text(json.dumps(config, indent=1))
    error_file = Path(os.environ.setdefault("FTW_ERROR_FILE", str(run_dir / "error.json")))
    error_file.unlink(missing_ok=True)  # a record left by an earlier failure is not this run's
    try:
        cache = preprocess(config_json)
        if isinstance(cache, int):
            return _failed("preprocess", cache, error_file)
        nproc = args.nproc if args.nproc is not None else max(1, visible_gpus())
        rc = subprocess.run(train_argv(config_json, run_dir, cache, nproc)).returncode
    except FtwError as e:
        return _report(e, EXIT_FAILED)
    if rc == 0:
        return _print_result(run_dir, json.loads((run_dir / "summary.json").read_text()))
    return _failed("train", rc, error_file)


def _print_result(run_dir: Path, summary: dict[str, Any]) -> int:
    print(json.dumps({"run_dir": str(run_dir), **{k: summary.get(k) for k in SUMMARY_KEYS}}))
    return 0


def _report(e: FtwError, rc: int) -> int:
    print(f"ftw train: {e.code}: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
    return rc


def _failed(stage: str, rc: int, error_file: Path) -> int:
    """The child already printed its error (worker.events.run_child); say only what it could not."""
    if rc == EXIT_PREEMPTED:
        print("ftw train: stopped after saving a checkpoint; run the same command again to resume", file=sys.stderr)
        return rc
    if read_error(error_file) is None:
        print(
            f"ftw train: the {stage} stage exited with code {rc} without reporting an error (killed, or out of memory?)",
            file=sys.stderr,
        )
    return EXIT_FAILED

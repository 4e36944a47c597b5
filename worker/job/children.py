"""The stage children's command lines, and their typed outputs read back from the run folder.

    preprocess  python -m worker.data RUN_DIR/config.json --output RUN_DIR/prepared.json → PreparedCache
    train       python -m worker.train RUN_DIR/config.json --run-dir RUN_DIR --data CACHE → TrainSummary

A stage whose module has not landed in this build fails with StageMissing — it is never faked.
Nothing here imports the stages' code: their presence is checked on disk and their outputs are
small JSON files, so the orchestrator stays free of torch/transformers/datasets.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.data.prepared import PreparedCache
from worker.errors import DataError, StageMissing, TrainingError
from worker.train.summary import TrainSummary

PACKAGE = Path(__file__).resolve().parents[1]
PREPARED_NAME = "prepared.json"


def require_module(stage: str, module: str) -> None:
    """StageMissing unless `python -m <module>` can run in this build."""
    folder = PACKAGE.joinpath(*module.split(".")[1:])
    if not (folder / "__main__.py").is_file():
        raise StageMissing(
            f"the {stage} stage ({module}) is not available in this build of ftw",
            "use an image built from a version of ftw that includes it; nothing was started",
            stage=stage,
        )


def compile_cache_env(env: Mapping[str, str], volume: Path) -> dict[str, str]:
    """Triton's and Inductor's compiled kernels on the volume, not on the container's disk: a fresh
    worker of the endpoint loads what an earlier worker compiled instead of compiling it again
    before its first step (both caches key their entries on the GPU, the versions and the source).
    The endpoint's own setting wins."""
    root = volume / "cache" / "compile"
    wanted = {"TRITON_CACHE_DIR": root / "triton", "TORCHINDUCTOR_CACHE_DIR": root / "inductor"}
    return {key: str(path) for key, path in wanted.items() if not env.get(key)}


def preprocess_argv(config_json: Path, output: Path) -> list[str]:
    require_module("preprocess", "worker.data")
    return [sys.executable, "-m", "worker.data", str(config_json), "--output", str(output)]


def train_argv(config_json: Path, run_dir: Path, cache_dir: Path, processes: int) -> list[str]:
    require_module("train", "worker.train")
    args = ["-m", "worker.train", str(config_json), "--run-dir", str(run_dir), "--data", str(cache_dir)]
    if processes > 1:  # one process per GPU; torchrun's agent stays in the group we supervise
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    return [sys.executable, *args]


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("complete") is True else None


def prepared_data(output: Path) -> PreparedCache:
    """The cache the preprocess child reported, verified complete (train never starts otherwise)."""
    prepared = PreparedCache.read(output)
    if prepared is None:
        raise DataError(
            f"preprocessing ended without writing its output ({output.name} is missing or malformed)",
            "this is a bug in ftw's preprocess stage; the log tail shows its last output",
            stage="preprocess",
        )
    if read_manifest(prepared.cache_dir) is None:
        raise DataError(
            f"preprocessing reported {prepared.cache_dir}, but its manifest.json is missing or not complete",
            "resubmit the job: an incomplete cache is never used, it is rebuilt",
            stage="preprocess",
        )
    return prepared


def trained_output(run_dir: Path, full_finetune: bool, merge: bool) -> TrainSummary | None:
    """What a finished train stage left in the run folder (summary.json and the weights), or None."""
    out_dir = run_dir / ("model" if full_finetune else "adapter")
    marker = out_dir / ("config.json" if full_finetune else "adapter_config.json")
    if not marker.is_file() or (merge and not (run_dir / "merged").is_dir()):
        return None
    return TrainSummary.read(run_dir)


def training_outputs(run_dir: Path, full_finetune: bool, merge: bool) -> TrainSummary:
    """What train left in the run folder, checked: the adapter (or model), merged, summary.json."""
    summary = trained_output(run_dir, full_finetune, merge)
    if summary is None:
        raise TrainingError(
            "training exited successfully but its output is incomplete in the run folder "
            f"({'model/' if full_finetune else 'adapter/'}{', merged/' if merge else ''} or summary.json missing)",
            "this is a bug in ftw's train stage; resubmit with the same run_id to retry from the last checkpoint",
            stage="train",
        )
    return summary


def newest_checkpoint(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint on the volume (complete ones carry ftw_state.json)."""
    steps = []
    for p in (run_dir / "checkpoints").glob("checkpoint-*"):
        tail = p.name.removeprefix("checkpoint-")
        if tail.isdigit() and (p / "ftw_state.json").is_file():
            steps.append(int(tail))
    return max(steps) if steps else None

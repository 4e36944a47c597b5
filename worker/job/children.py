"""The stage children's command lines and the checks of what they left behind (docs/contracts.md).

A stage whose module has not landed in this build fails with StageMissing — it is never faked.
Nothing here imports the stages: their presence is checked on disk, so the orchestrator stays
free of torch/transformers/datasets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from worker.errors import DataError, StageMissing, TrainingError

PACKAGE = Path(__file__).resolve().parents[1]


def require_module(stage: str, module: str) -> None:
    """StageMissing unless `python -m <module>` can run in this build."""
    folder = PACKAGE.joinpath(*module.split(".")[1:])
    if not (folder / "__main__.py").is_file():
        raise StageMissing(
            f"the {stage} stage ({module}) is not available in this build of ftw",
            "use an image built from a version of ftw that includes it; nothing was started",
            stage=stage,
        )


def preprocess_argv(config_json: Path) -> list[str]:
    require_module("preprocess", "worker.data")
    return [sys.executable, "-m", "worker.data", str(config_json)]


def train_argv(config_json: Path, run_dir: Path, cache_dir: Path, gpu_count: int) -> list[str]:
    require_module("train", "worker.train")
    args = ["-m", "worker.train", str(config_json), "--run-dir", str(run_dir), "--data", str(cache_dir)]
    if gpu_count > 1:  # one process per GPU; torchrun's agent stays in the group we supervise
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpu_count}", *args]
    return [sys.executable, *args]


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("complete") is True else None


def prepared_cache(last_stdout_line: str) -> tuple[Path, dict[str, Any]]:
    """The cache the preprocess child announced, verified complete (train never starts otherwise)."""
    try:
        summary = json.loads(last_stdout_line)
        cache_dir = Path(summary["cache_dir"])
    except (ValueError, KeyError, TypeError):
        raise DataError(
            "preprocessing ended without announcing its cache (no JSON summary with cache_dir on its last output line)",
            "this is a bug in ftw's preprocess stage; the log tail shows its last output",
            stage="preprocess",
        ) from None
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise DataError(
            f"preprocessing reported {cache_dir}, but its manifest.json is missing or not complete",
            "resubmit the job: an incomplete cache is never used, it is rebuilt",
            stage="preprocess",
        )
    return cache_dir, {k: v for k, v in summary.items() if k != "cache_dir"}


def training_outputs(run_dir: Path, full_finetune: bool, merge: bool) -> dict[str, Any]:
    """What train left in the run folder, checked: the adapter (or model), merged, summary metrics."""
    out_dir = run_dir / ("model" if full_finetune else "adapter")
    marker = out_dir / ("config.json" if full_finetune else "adapter_config.json")
    if not marker.is_file():
        raise TrainingError(
            f"training exited successfully but {marker.relative_to(run_dir)} is missing from the run folder",
            "this is a bug in ftw's train stage; resubmit with the same run_id to retry from the last checkpoint",
            stage="train",
        )
    if merge and not (run_dir / "merged").is_dir():
        raise TrainingError(
            "merge_lora was asked but the merged model is missing from the run folder",
            "resubmit with the same run_id",
            stage="train",
        )
    return {"metrics": training_metrics(run_dir), "output": out_dir.name}


def training_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and not isinstance(v, dict)}
        if isinstance(summary, dict)
        else {}
    )


def newest_checkpoint(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint on the volume (complete ones carry ftw_state.json)."""
    steps = []
    for p in (run_dir / "checkpoints").glob("checkpoint-*"):
        tail = p.name.removeprefix("checkpoint-")
        if tail.isdigit() and (p / "ftw_state.json").is_file():
            steps.append(int(tail))
    return max(steps) if steps else None

"""How much disk a job will need, from metadata only (no model load, no download), and whether the
volume has it.

The base model's size comes from its shape (worker/estimate/shapes.py: a local folder's weights,
else the Hub's metadata). Disk = model download (Hub models only) + datasets + their prepared
cache + checkpoints × save_total_limit + final adapter/model + merged model, plus a margin.
Each part is reported, so a failure can say exactly what does not fit.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from schemas.paths import is_local, resolve_local_path
from worker.errors import InfraError
from worker.estimate.shapes import ModelShape, adapter_params, model_shape

MiB = 1 << 20
MARGIN = 0.10
FIXED_OVERHEAD = 4 * MiB  # logs, config, state, events


@dataclass
class DiskEstimate:
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        subtotal = sum(self.parts.values())
        return int(subtotal * (1 + MARGIN)) + FIXED_OVERHEAD

    def as_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total, "parts_bytes": dict(self.parts), "notes": list(self.notes)}


def human(n: float) -> str:
    """Bytes as a person reads them: 512 B, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def dataset_bytes(cfg: TrainingConfig, env: Mapping[str, str]) -> tuple[int, list[str]]:
    total, notes = 0, []
    paths = [ds.path for ds in [*(cfg.datasets or []), *(cfg.test_datasets or [])]]
    for path in paths + [ds.path for ds in cfg.pretraining_dataset or []]:
        if is_local(path):
            p = resolve_local_path(path, env)
            if p.is_file():
                total += p.stat().st_size
            elif p.is_dir():
                total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            notes.append(f"dataset {path}: size not known before download (not counted)")
    return total, notes


def estimate_disk(cfg: TrainingConfig, env: Mapping[str, str]) -> tuple[DiskEstimate, ModelShape | None]:
    est = DiskEstimate()
    shape, download = model_shape(cfg, env)
    if shape is None:
        est.notes.append(f"base model {cfg.base_model}: size unknown before download (not counted)")
    elif download:
        est.parts["base_model_download"] = shape.bytes_on_disk
    data, notes = dataset_bytes(cfg, env)
    est.notes += notes
    if data:
        est.parts["datasets"] = data
        est.parts["prepared_cache"] = 2 * data  # int32 ids + labels + positions per token ≈ 2× the text
    if shape is not None:
        if cfg.adapter:
            adapter = adapter_params(cfg, shape) * 4
            optimizer = 0 if cfg.save_only_model else 2 * adapter
            est.parts["checkpoints"] = (adapter + optimizer) * cfg.save_total_limit
            est.parts["adapter"] = adapter
            if cfg.merge_lora:
                est.parts["merged_model"] = shape.params * 2
        else:
            weights = shape.params * 2
            optimizer = 0 if cfg.save_only_model else shape.params * 8
            est.parts["checkpoints"] = (weights + optimizer) * cfg.save_total_limit
            est.parts["model"] = weights
    return est, shape


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_disk(est: DiskEstimate, volume: Path) -> dict[str, Any]:
    """Fail with the numbers when the estimate does not fit on the volume's filesystem."""
    free = free_bytes(volume)
    report = {**est.as_dict(), "free_bytes": free, "volume": str(volume)}
    if est.total > free:
        parts = ", ".join(f"{k} {human(v)}" for k, v in est.parts.items())
        raise InfraError(
            f"not enough disk on {volume}: the job needs about {human(est.total)} "
            f"({parts}, +{int(MARGIN * 100)}% margin) but only {human(free)} is free",
            "attach a larger network volume, lower save_total_limit, use save_only_model, or skip merge_lora",
            details=report,
        )
    return report

"""RunPod's serverless GPU types with their memory, price and bf16 peak (runpod_gpus.toml)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("runpod_gpus.toml")


@dataclass(frozen=True)
class GpuType:
    name: str
    group: str
    memory_gib: float
    usd_per_s: float
    bf16_tflops: float


@dataclass(frozen=True)
class GpuTable:
    gpus: tuple[GpuType, ...]
    source: str
    read_on: str

    def find(self, name: str) -> GpuType | None:
        """The type RunPod (or nvidia-smi) calls `name`; case and spacing do not matter."""
        key = " ".join(name.lower().split())
        return next((g for g in self.gpus if " ".join(g.name.lower().split()) == key), None)


@lru_cache(maxsize=1)
def gpu_table(path: Path = TABLE) -> GpuTable:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    gpus = tuple(
        GpuType(g["name"], g["group"], float(g["memory_gib"]), float(g["usd_per_s"]), float(g["bf16_tflops"]))
        for g in data["gpu"]
    )
    return GpuTable(gpus, data["source"], data["read_on"])

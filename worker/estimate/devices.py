"""The GPUs a job got, as records: what the checks' probe (worker/checks/gpu.py, which runs
`nvidia-smi`) found, and what the memory check and the result's cost metrics read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CONTEXT_HEADROOM = 1 << 30  # CUDA context + allocator slack per device


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    total_mib: int
    used_mib: int
    free_mib: int
    compute_capability: str = ""  # "9.0"; "" where nvidia-smi did not say


@dataclass(frozen=True)
class ComputeProcess:
    gpu_uuid: str
    pid: int
    used_mib: int
    name: str


@dataclass
class GpuProbe:
    devices: list[Gpu] = field(default_factory=list)
    processes: list[ComputeProcess] = field(default_factory=list)
    visible: str | None = None
    driver: str = ""
    cpu_only: bool = False
    elapsed_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.devices)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_only": self.cpu_only,
            "count": self.count,
            "visible_devices": self.visible,
            "driver": self.driver,
            "devices": [asdict(d) for d in self.devices],
            "foreign_processes": [asdict(p) for p in self.processes],
            "elapsed_s": round(self.elapsed_s, 3),
        }

"""The train stage's typed output, read back from RUN_DIR/summary.json (worker.train.outputs writes it).

Imports nothing heavy: the orchestrator reads it without torch. Training is finished in a run folder
when summary.json reads back and the trained weights it names are there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    final_loss: float | None
    tokens_per_s: float
    runtime_s: float
    artifacts: dict[str, Any]  # adapter | model, merged, loss_png: their paths
    metrics: dict[str, Any]  # every scalar of summary.json (the job result's metrics)

    @classmethod
    def read(cls, run_dir: Path) -> TrainSummary | None:
        """summary.json as written by the train child, or None when it is missing or not this shape."""
        try:
            raw = json.loads((run_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
            return cls(
                steps=int(raw["steps"]),
                final_loss=raw.get("final_loss"),
                tokens_per_s=raw["tokens_per_s"],
                runtime_s=raw["runtime_s"],
                artifacts=dict(raw.get("artifacts") or {}),
                metrics={k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool))},
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def line(self, run_dir: Path) -> dict[str, Any]:
        """What `ftw train` prints last: the run folder and the numbers a terminal user reads."""
        return {
            "run_dir": str(run_dir),
            "steps": self.steps,
            "final_loss": self.final_loss,
            "tokens_per_s": self.tokens_per_s,
            "runtime_s": self.runtime_s,
            "artifacts": self.artifacts,
        }

"""The preprocess stage's typed output: the prepared cache a run trains on, and what preparing it did.

The child (`python -m worker.data CONFIG_JSON --output FILE`) writes it to a file of the run folder;
the orchestrator reads it back (worker.job.children.prepared_data) instead of parsing the child's
output, which stays for people. Imports nothing heavy: the orchestrator reads it without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PreparedCache:
    cache_dir: Path
    summary: dict[str, Any]  # rows, tokens, packing, built, seconds (worker.data.pipeline.prepare)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> PreparedCache:
        return cls(Path(summary["cache_dir"]), {k: v for k, v in summary.items() if k != "cache_dir"})

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"cache_dir": str(self.cache_dir), "summary": self.summary}), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> PreparedCache | None:
        """What the child wrote, or None when the file is missing or not this shape."""
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            return cls(Path(value["cache_dir"]), dict(value["summary"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

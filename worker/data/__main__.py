"""The preprocess child: `python -m worker.data CONFIG_JSON` (the orchestrator's config.json).

Progress goes to FTW_EVENTS, a failure to FTW_ERROR_FILE (worker.events.run_child); the summary,
with "cache_dir", is the last stdout line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from worker.events import run_child


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m worker.data CONFIG_JSON", file=sys.stderr)
        return 2
    from schemas.config import TrainingConfig
    from worker.data.pipeline import prepare

    cfg = TrainingConfig.model_validate_json(Path(sys.argv[1]).read_text(encoding="utf-8"))
    summary = prepare(cfg)
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    run_child(main)

"""The preprocess child: `python -m worker.data CONFIG_JSON [--output FILE]` (the orchestrator's config.json).

Progress goes to FTW_EVENTS, a failure to FTW_ERROR_FILE (worker.events.run_child); the typed
output (worker.data.prepared.PreparedCache) to FILE; stdout gets the summary table, for people.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.events import run_child


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.data", description=__doc__.splitlines()[0])
    parser.add_argument("config_json", type=Path)
    parser.add_argument("--output", type=Path, help="where to write the PreparedCache (JSON)")
    args = parser.parse_args()
    from schemas.config import TrainingConfig
    from worker.data.pipeline import prepare, summary_table
    from worker.data.prepared import PreparedCache

    cfg = TrainingConfig.model_validate_json(args.config_json.read_text(encoding="utf-8"))
    summary = prepare(cfg)
    print(summary_table(summary), flush=True)
    if args.output is not None:
        PreparedCache.from_summary(summary).write(args.output)
    return 0


if __name__ == "__main__":
    run_child(main)

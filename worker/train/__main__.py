"""Child entry of the train stage: `python -m worker.train CONFIG_JSON --run-dir RUN_DIR --data CACHE_DIR`.

The config is the orchestrator's already-validated `RUN_DIR/config.json`. Under torchrun every
rank runs this; rank 0 alone reports progress. See worker/train/child.py for the contract.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from worker.events import run_child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.train", description=__doc__.splitlines()[0])
    parser.add_argument("config_json", type=Path)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, required=True, help="prepared-data cache folder (manifest.json, train/, eval/)"
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(asctime)s [rank{rank}] %(message)s"
    )
    from schemas.config import TrainingConfig
    from worker.train.child import run

    cfg = TrainingConfig.model_validate_json(args.config_json.read_text())
    return run(cfg, args.run_dir, args.data)


if __name__ == "__main__":
    run_child(main)

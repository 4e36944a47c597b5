"""A rank of tests/train/test_joined_steps.py's two-process runs, under torchrun: the train stage's child as
`python -m worker.train` runs it, padding-free on a CPU (which has no varlen kernel: transformers' block mask for
packed position ids splits the joined rows instead), and each rank's count of training forwards written to
OUT/rank<r>.json.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.train.joined_ranks CONFIG RUN CACHE OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(config_json: str, run_dir: str, cache: str, out: str) -> int:
    import worker.train.trainer as trainer
    from schemas.config import TrainingConfig
    from worker.train.child import run

    trainer.padding_free = lambda *args: True
    forwards = [0]
    setup = trainer.Trainer.setup

    def setup_and_count(self):
        setup(self)
        self.engine.register_forward_pre_hook(
            lambda module, args: forwards.__setitem__(0, forwards[0] + module.training)
        )

    trainer.Trainer.setup = setup_and_count
    code = run(TrainingConfig.model_validate_json(Path(config_json).read_text()), Path(run_dir), Path(cache))
    Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({"forwards": forwards[0]}))
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

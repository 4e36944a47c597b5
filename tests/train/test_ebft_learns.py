"""Strided EBFT through `ftw run` end to end on CPU: a tiny Llama (random weights, fully fine-tuned:
the features come from a frozen copy of its starting weights) on documents that count digits from a
random start; over training the feature-matching loss (CFM, a train metric) and the held-out
cross-entropy of the ground-truth continuations (the eval loss) both fall, both are drawn in the
run's loss.png, and the model is published like any other."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.train.helpers import run_events, run_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def counting_documents(n: int, length: int = 24, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start = rng.randrange(10)
        docs.append({"text": " ".join(str((start + i) % 10) for i in range(length))})
    return docs


def mean(points: list[float]) -> float:
    return sum(points) / len(points)


def test_strided_ebft_through_ftw_run_lowers_cfm_and_held_out_ce(task_model_dir: Path, volume: Path, tmp_path: Path):
    model = shutil.copytree(task_model_dir, volume / "model")  # a job reads local models under BASE_VOLUME
    (volume / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in counting_documents(240)))
    job: dict[str, Any] = {
        "input": {
            "run_id": "ebft-strided",
            "allow_cpu": True,
            "config": {
                "base_model": str(model),
                "rl": "ebft",
                "ebft": {
                    "mode": "strided",
                    "stride": 4,
                    "context_length": 4,
                    "generate_max_len": 4,
                    "n_samples_per_prompt": 4,
                    "temperature": 0.6,
                    "feature_layers": [0.5, 1.0],
                    "ce_coef": 1.0,
                },
                "datasets": [{"path": str(volume / "docs.jsonl"), "type": "ebft_pretrain.transform"}],
                "val_set_size": 0.04,
                "eval_steps": 8,
                "sequence_len": 64,
                "micro_batch_size": 2,
                "max_steps": 32,
                "learning_rate": 1e-3,
                "optimizer": "adamw_torch",
                "lr_scheduler": "constant",
                "logging_steps": 1,
                "seed": 1,
            },
        }
    }
    result = run_job(job, tmp_path, volume, timeout=500)
    assert result["status"] == "completed", result
    assert result["artifacts"], result

    run = volume / "runs" / "ebft-strided"
    events = run_events(run)
    steps = sorted((e["step"], e) for e in events if e.get("stage") == "train" and "ebft/cfm_loss" in e and "lr" in e)
    assert len(steps) == 32
    cfm = [e["ebft/cfm_loss"] for _, e in steps]
    assert mean(cfm[-8:]) < 0.3 * mean(cfm[:8]), cfm
    summary = json.loads(next(run.rglob("summary.json")).read_text())
    held_out_ce = [loss for _, loss in summary["eval_curve"]]
    assert len(held_out_ce) >= 4 and held_out_ce[-1] < 0.3 * held_out_ce[0], held_out_ce
    assert Path(summary["artifacts"]["loss_png"]).stat().st_size > 0
    print("cfm", [round(c, 3) for c in cfm], "held-out CE", held_out_ce)

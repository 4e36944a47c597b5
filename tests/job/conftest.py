"""Fixtures of the job-worker tests: a volume holding the bundled example's model and data."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_JOB = REPO / "examples" / "demo_job.json"
EXAMPLE_DATA = REPO / "examples" / "data" / "greetings.jsonl"


def example_job(**overrides: Any) -> dict[str, Any]:
    """The bundled example job's input, with top-level keys (and `config` keys) overridden."""
    job = copy.deepcopy(json.loads(EXAMPLE_JOB.read_text())["input"])
    config = overrides.pop("config", {})
    job.update(overrides)
    job["config"].update(config)
    return job


@pytest.fixture
def demo_volume(volume: Path, tiny_model_dir: Path) -> Path:
    """BASE_VOLUME laid out as `make demo` lays it out: models/ftw-tiny-chatml and data/greetings.jsonl."""
    shutil.copytree(tiny_model_dir, volume / "models" / "ftw-tiny-chatml")
    (volume / "data").mkdir()
    shutil.copy(EXAMPLE_DATA, volume / "data" / "greetings.jsonl")
    return volume


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"input": job}))
    return path

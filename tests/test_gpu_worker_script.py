"""bench/gpu_worker.sh runs its job through handler.py or not at all: without the worker's packages
and without wheels to install them from, it stops with one clear line instead of going around it."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO, child_env


def test_without_runpod_and_without_wheels_the_script_fails_loudly(tmp_path):
    bare = "/usr/bin/python3"  # the system Python: none of ftw's worker packages
    assert subprocess.run([bare, "-c", "import runpod"], capture_output=True).returncode != 0
    done = subprocess.run(
        ["bash", "bench/gpu_worker.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(PYTHON=bare, FTW_WHEELS=str(tmp_path / "no-wheels"), OUT=str(tmp_path / "out")),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: this Python lacks ftw's worker packages" in done.stdout and "bench/gpu_wheels.py" in done.stdout
    assert not (tmp_path / "out" / "job_result.json").exists()

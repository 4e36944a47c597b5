"""bench/moe.py runs end to end at its tiny shape on CPU: each arm in its own process, one table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_moe_tiny_prints_a_row_per_arm_with_the_same_loss():
    proc = subprocess.run(
        [
            sys.executable,
            "bench/moe.py",
            "--shapes",
            "tiny",
            "--arms",
            "peft",
            "axolotl",
            "ftw",
            "--seq",
            "16",
            "--layers",
            "1",
            "--warmup",
            "1",
            "--steps",
            "1",
        ],
        cwd=REPO,
        env=child_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in proc.stdout.splitlines()
        if line.startswith("| tiny |")
    }
    assert set(rows) == {"peft", "axolotl", "ftw"}, proc.stdout
    assert rows["peft"][3] == "1.00x" and rows["ftw"][6].startswith("scattermoe_lora, rmsnorm")
    assert abs(float(rows["ftw"][5]) - float(rows["peft"][5])) < 1e-3  # the same model, tokens and LoRA in both arms
    assert "skipped" in rows["axolotl"][2] or rows["axolotl"][3].endswith(
        "x"
    )  # absent here unless its wheel is on PYTHONPATH

"""bench/host_samples.py: the train stage's step sampled from outside its process by the real py-spy, and arms
compared function by function (how the real path's host-bound step was split against the bare loop's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.host_samples import frame_name, report, sampled

REPO = Path(__file__).resolve().parents[2]


def test_without_host_samples_the_command_runs_as_it_is(monkeypatch):
    monkeypatch.delenv("HOST_SAMPLES", raising=False)
    assert sampled(["python", "-m", "worker.train"], "ftw") == ["python", "-m", "worker.train"]


def test_a_sampled_train_stage_shows_its_step_by_part(tmp_path, monkeypatch):
    """The real train stage on a tiny model on the CPU, under py-spy: its loop's samples name the step's forward
    (through the objective) and backward in both arms, and the table gives their difference."""
    monkeypatch.setenv("HOST_SAMPLES", str(tmp_path / "probe"))
    probe = subprocess.run(
        sampled([sys.executable, "-c", "import time; time.sleep(1)"], "probe"), capture_output=True, text=True
    )
    if probe.returncode != 0 and "ermission" in probe.stderr:  # a container that forbids reading another process
        pytest.skip(f"py-spy may not read a child's memory here: {probe.stderr.strip()[-200:]}")
    assert probe.returncode == 0, probe.stderr
    samples = tmp_path / "samples"
    run = subprocess.run(
        [sys.executable, "bench/gpu_train.py", "--out", str(tmp_path / "out"), "--shape", "tiny", "--steps", "6"]
        + ["--warmup", "2", "--arms", "ftw,ftw~no-clip", "--unpacked", "--no-profile", "--no-merge"],
        cwd=REPO,
        env={**os.environ, "HOST_SAMPLES": str(samples)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in samples.iterdir()) == ["ftw.txt", "ftw~no-clip.txt"]
    table = report(samples, steps=8, base="ftw", rows=400)
    loop_ms = {
        arm: float(ms)
        for arm, ms in (part.split(": ") for part in table.splitlines()[0].split(" at 200 Hz: ")[1].split(" · "))
    }
    assert loop_ms["ftw"] > 0 and loop_ms["ftw~no-clip"] > 0
    by_total = table.split("By own time")[0]
    rows = {cells[0]: cells[1:] for cells in map(row_cells, by_total.splitlines()) if cells}
    for part in ("Trainer.train_step (train/trainer.py)", "SupervisedObjective.loss (train/objective.py)"):
        ftw, no_clip, difference = map(float, rows[part])  # both arms' steps pass through it
        assert ftw > 0 and no_clip > 0 and abs(difference - (no_clip - ftw)) <= 0.11  # each figure rounded
    assert any(name.startswith("Tensor.backward") for name in rows)


def row_cells(line: str) -> list[str]:
    """A function's row of the tables (its name, then figures); [] for any other line."""
    if not line.startswith("| `"):
        return []
    return [cell.strip(" `") for cell in line.strip("|").split("|")]


def test_arms_are_compared_on_the_main_threads_loop_alone(tmp_path):
    """py-spy's raw lines: another thread's samples and the main thread's outside the loop (loading) do not count;
    both loops' frames (the train stage's, the bare loop's) start the stack that counts."""
    (tmp_path / "bare.txt").write_text(
        "thread (1): MainThread;<module> (bench/train_throughput.py:391);run_arm.<locals>.step "
        "(bench/train_throughput.py:184);forward (m.py:1) 30\n"
        "thread (1): MainThread;<module> (bench/train_throughput.py:391);build (bench/train_throughput.py:78) 500\n"
        "thread (2): gpu-clocks;GpuClocks._read (worker/train/gpu_clocks.py:69) 900\n"
    )
    (tmp_path / "ftw.txt").write_text(
        "thread (7): MainThread;run (worker/train/child.py:50);Trainer.train (/x/worker/train/trainer.py:264);"
        "Trainer.train_step (/x/worker/train/trainer.py:168);forward (m.py:3) 30\n"
        "thread (7): MainThread;Trainer.train (worker/train/trainer.py:260);"
        "Trainer.train_step (worker/train/trainer.py:183);clip_grad_norm_ (torch/nn/utils/clip_grad.py:224) 10\n"
    )
    table = report(tmp_path, steps=10, base="bare", rows=10)
    assert table.splitlines()[0].endswith("bare: 15.0 · ftw: 20.0")  # 30 (40) samples of 5 ms over 10 steps
    rows = [line for line in table.split("By own time")[0].splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `Trainer.train_step (train/trainer.py)` | 0.0 | 20.0 | +20.0")
    assert "| `forward (m.py)` | 15.0 | 15.0 | +0.0 |" in rows
    assert not any("build" in r or "GpuClocks" in r for r in rows)


def test_frame_names_drop_line_numbers_and_keep_qualnames():
    assert frame_name("f (/opt/site-packages/torch/nn/modules/module.py:1775)") == "f (modules/module.py)"
    assert (
        frame_name("run_arm.<locals>.step (train_throughput.py:184)") == "run_arm.<locals>.step (train_throughput.py)"
    )

"""FTW_PROFILE_STEPS (worker/train/profile.py): a window of real training steps under torch.profiler and cProfile,
written to RUN_DIR/profile.txt, so that an operator can tell a host-bound step from a kernel-bound one and name the
Python code that spends a host-bound step's time."""

from __future__ import annotations

import logging
import re

import pytest

from tests.train.helpers import base_config, pack, run_inprocess, successor_task, tokenize, write_cache


def run_steps(model_dir, tmp_path, samples: int, steps: int) -> int:
    """A real run of `steps` steps over packed rows of the first `samples` samples; its exit code."""
    from transformers import AutoTokenizer

    task, _ = successor_task()
    rows = tokenize(AutoTokenizer.from_pretrained(model_dir), task[:samples])
    cache = write_cache(tmp_path / "cache", pack(rows, 64), packed=True, sequence_len=64)
    return run_inprocess(base_config(model_dir, micro_batch_size=1, max_steps=steps), tmp_path / "run", cache)


def test_the_window_writes_its_steps_walls_ops_and_python_functions(task_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FTW_PROFILE_STEPS", "2:4")
    assert run_steps(task_model_dir, tmp_path, 64, 5) == 0

    text = (tmp_path / "run" / "profile.txt").read_text()
    walls = [float(w) for w in re.search(r"step wall s: \[(.*?)\]", text).group(1).split(",")]
    assert len(walls) == 2 and all(w > 0 for w in walls)  # steps 2 and 3, not the others
    assert "aten::mm" in text.split("== by GPU time ==")[0]  # torch's ops of the steps
    own = text.split("== Python functions by own time ==")[1].split("== Python functions by total time ==")[0]
    total = text.split("== Python functions by total time ==")[1]
    assert "function calls" in own and "function calls" in total
    assert re.search(r"trainer\.py:\d+\(", total)  # the trainer's own step code, by its total time


def test_without_the_variable_nothing_is_profiled(task_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("FTW_PROFILE_STEPS", raising=False)
    assert run_steps(task_model_dir, tmp_path, 16, 2) == 0
    assert not (tmp_path / "run" / "profile.txt").exists()


def test_a_window_past_the_runs_end_closes_with_the_run(task_model_dir, tmp_path, monkeypatch):
    """Steps 4..8 on a 5-step run: the last step is profiled and written, not lost with the unclosed window."""
    monkeypatch.setenv("FTW_PROFILE_STEPS", "4:9")
    assert run_steps(task_model_dir, tmp_path, 32, 5) == 0
    text = (tmp_path / "run" / "profile.txt").read_text()
    assert len(re.search(r"step wall s: \[(.*?)\]", text).group(1).split(",")) == 1


@pytest.mark.parametrize("spec", ["7:9", "8-12", "2:2"])
def test_a_window_naming_no_step_of_the_run_says_so(spec, task_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FTW_PROFILE_STEPS", spec)
    with caplog.at_level(logging.WARNING, logger="ftw.train"):
        assert run_steps(task_model_dir, tmp_path, 16, 2) == 0
    assert not (tmp_path / "run" / "profile.txt").exists()
    assert any(f"FTW_PROFILE_STEPS={spec!r}" in r.getMessage() and "no steps profiled" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_a_window_that_cannot_be_written_warns_and_leaves_the_runs_own_error_alone(tmp_path, caplog):
    """The trainer closes the window in its `finally`: a failure there must not replace the error that stopped the
    run."""
    from worker.train.profile import StepProfiler

    profiler = StepProfiler(tmp_path / "gone", range(0, 5), "0:2")  # its run folder is not there to write into
    profiler.before_step(0)
    with caplog.at_level(logging.WARNING, logger="ftw.train"):
        profiler.close()
    assert profiler.prof is None and not (tmp_path / "gone").exists()
    assert any("could not be written" in r.getMessage() for r in caplog.records)

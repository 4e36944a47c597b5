"""FTW_PROFILE_STEPS (worker/train/profile.py): a window of real training steps under torch.profiler and cProfile,
written to RUN_DIR/profile.txt, so that an operator can tell a host-bound step from a kernel-bound one and name the
Python code that spends a host-bound step's time."""

from __future__ import annotations

import re

from tests.train.helpers import base_config, pack, run_inprocess, successor_task, tokenize, write_cache


def test_the_window_writes_its_steps_walls_ops_and_python_functions(task_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    train, _ = successor_task()
    rows = tokenize(AutoTokenizer.from_pretrained(task_model_dir), train[:64])
    cache = write_cache(tmp_path / "cache", pack(rows, 64), packed=True, sequence_len=64)
    monkeypatch.setenv("FTW_PROFILE_STEPS", "2:4")
    assert run_inprocess(base_config(task_model_dir, micro_batch_size=1, max_steps=5), tmp_path / "run", cache) == 0

    text = (tmp_path / "run" / "profile.txt").read_text()
    walls = [float(w) for w in re.search(r"step wall s: \[(.*?)\]", text).group(1).split(",")]
    assert len(walls) == 2 and all(w > 0 for w in walls)  # steps 2 and 3, not the others
    assert "aten::mm" in text.split("== by GPU time ==")[0]  # torch's ops of the steps
    own = text.split("== Python functions by own time ==")[1].split("== Python functions by total time ==")[0]
    total = text.split("== Python functions by total time ==")[1]
    assert "function calls" in own and "function calls" in total
    assert re.search(r"trainer\.py:\d+\(", total)  # the trainer's own step code, by its total time


def test_without_the_variable_nothing_is_profiled(task_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    train, _ = successor_task()
    rows = tokenize(AutoTokenizer.from_pretrained(task_model_dir), train[:16])
    cache = write_cache(tmp_path / "cache", pack(rows, 64), packed=True, sequence_len=64)
    monkeypatch.delenv("FTW_PROFILE_STEPS", raising=False)
    assert run_inprocess(base_config(task_model_dir, micro_batch_size=1, max_steps=2), tmp_path / "run", cache) == 0
    assert not (tmp_path / "run" / "profile.txt").exists()

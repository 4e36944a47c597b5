"""Checkpoints survive anything: kill -9 at a random step, SIGTERM, a checkpoint damaged on disk.

One uninterrupted run is the reference. A second run of the same config is killed with SIGKILL at
a random step, restarted (it resumes from the newest complete checkpoint), stopped with SIGTERM
(exit 75 after saving that step), its newest checkpoint is then truncated on disk, and a last
restart resumes from the one before and finishes. Its adapter must equal the reference's within
rtol 1e-5 / atol 1e-7 (same data order, RNG with lora_dropout, optimizer and schedule state).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import REPO
from tests.train.helpers import (
    adapter_tensors,
    base_config,
    events,
    pack,
    run_inprocess,
    train_argv,
    train_env,
    write_cache,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def wait_for(proc, run_dir, predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in events(run_dir) if predicate(e)]
        if found:
            return found[-1]
        if proc.poll() is not None:
            raise AssertionError(f"train child exited {proc.returncode} early:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the train child")


def start(cfg, run_dir, cache):
    config_json = write_config(run_dir, cfg)
    return subprocess.Popen(
        train_argv(config_json, run_dir, cache),
        env=train_env(run_dir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def train_step_at_least(n):
    return lambda e: e.get("stage") == "train" and isinstance(e.get("step"), int) and "loss" in e and e["step"] >= n


def test_kill9_sigterm_and_damaged_checkpoint_resume_to_the_same_adapter(task_model_dir, task_rows, tmp_path):
    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", pack(train[:240], 128), packed=True, sequence_len=128)
    cfg = base_config(
        task_model_dir,
        micro_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=20,
        save_steps=3,
        save_total_limit=4,
        lora_dropout=0.1,
        lr_scheduler="cosine",
        warmup_steps=3,
        learning_rate=2e-3,
        sequence_len=128,
    )
    assert run_inprocess(cfg, tmp_path / "reference", cache) == 0
    reference = adapter_tensors(tmp_path / "reference" / "adapter")

    run_dir = tmp_path / "run"
    rng = random.Random()
    kill_at = rng.randint(4, 10)  # leaves the SIGTERM below 9+ steps before the end
    print(f"kill -9 at step >= {kill_at}")
    proc = start(cfg, run_dir, cache)
    wait_for(proc, run_dir, train_step_at_least(kill_at))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_step = max(e["step"] for e in events(run_dir) if "loss" in e)
    checkpoints = run_dir / "checkpoints"
    complete = sorted(
        int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / "ftw_state.json").is_file()
    )
    assert complete and complete[-1] <= killed_step

    # restart: resumes from the newest complete checkpoint; then SIGTERM → save this step, exit 75
    proc = start(cfg, run_dir, cache)
    started = wait_for(proc, run_dir, lambda e: e.get("event") == "start" and e["step"] > 0)
    assert started["resumed_from"] == f"checkpoint-{complete[-1]}"
    assert started["step"] == complete[-1]
    wait_for(proc, run_dir, train_step_at_least(complete[-1] + 2))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    preempted = [e for e in events(run_dir) if e.get("event") == "preempted"][-1]
    stopped = checkpoints / f"checkpoint-{preempted['step']}"
    assert json.loads((stopped / "ftw_state.json").read_text())["step"] == preempted["step"]
    assert not list(checkpoints.glob(".tmp-*"))

    # damage the newest checkpoint on disk: it must never be picked
    weights = stopped / "trainable.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    older = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if p != stopped)

    proc = start(cfg, run_dir, cache)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    last_start = [e for e in events(run_dir) if e.get("event") == "start"][-1]
    assert last_start["resumed_from"] == f"checkpoint-{older}"

    resumed = adapter_tensors(run_dir / "adapter")
    assert set(resumed) == set(reference)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    summary = json.loads((run_dir / "summary.json").read_text())
    ref_summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["resumed_from"] == f"checkpoint-{older}"
    # the loss curve carried through the checkpoints equals the uninterrupted one
    assert [s for s, _ in summary["loss_curve"]] == list(range(1, 21))
    assert [loss for _, loss in summary["loss_curve"]] == pytest.approx(
        [loss for _, loss in ref_summary["loss_curve"]], rel=1e-5
    )

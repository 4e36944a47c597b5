"""Each step's time on the GPU's own clock (`step_ms` in its event, worker/train/step_queue.py): the trainer reads a
step back a step or two late, or several at once, so the events' timestamps do not time steps; the benches take
`step_ms` where it is there (bench/models.py `seconds_per_step`)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

from bench.gpu_train_arms import cpu_times, host_load, step_tokens, timed_busy_share
from bench.models import seconds_per_step
from tests.train.helpers import base_config, events, run_inprocess, write_cache
from worker.train.step_queue import Readout, device_mark


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU run's events: on a GPU machine the run takes CUDA")
def test_off_cuda_a_readout_has_no_time_and_the_events_none(task_model_dir, task_rows, tmp_path, monkeypatch):
    assert device_mark(torch.device("cpu")) is None
    readout = Readout(torch.tensor([1.0, 2.0]))
    assert readout.values() == [1.0, 2.0] and readout.ms_after(None) is None
    train, _, _ = task_rows
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FTW_EVENTS", str(run_dir / "events.jsonl"))
    cfg = base_config(task_model_dir, max_steps=3, save_strategy="no")
    assert run_inprocess(cfg, run_dir, write_cache(tmp_path / "cache", train[:24])) == 0
    steps = [e for e in events(run_dir) if "loss" in e and "event" not in e]
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert all("step_ms" not in e and e["tokens_per_s"] > 0 for e in steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens = [e["tokens"] for e in steps]  # trained so far: a window's rate from its ends (bench/gpu_train_arms.py)
    assert 0 < tokens[0] < tokens[1] < tokens[2] == summary["tokens"]
    by_step = {e["step"]: e for e in steps}  # each timed step's own tokens, for bench/gpu_train.py's arms
    assert step_tokens(by_step, 1, 3) == [tokens[1] - tokens[0], tokens[2] - tokens[1]]
    del by_step[2]["tokens"]  # a tree whose events lack the count: no per-step figures rather than wrong ones
    assert step_tokens(by_step, 1, 3) is None


def test_host_load_sees_a_busy_cpu_over_an_arm():
    """bench/gpu_train.py names the load beside each arm: a child spinning one CPU for a second shows as ≥ 0.8 busy
    CPUs (the machine's other work can only add), and the steal share is a share."""
    before = cpu_times()
    subprocess.run([sys.executable, "-c", "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1: pass"])
    load = host_load(before, cpu_times())
    assert load["cpus_busy"] >= 0.8 and 0.0 <= load["cpu_steal_share"] <= 1.0
    assert host_load(None, before) == {}


def test_seconds_per_step_takes_the_gpu_times_over_the_timestamps():
    """Timestamps of a queue two steps deep: the first of the window written a step late, the last on time; the
    GPU's times say 0.5 s a step, the timestamps 0.45."""
    gpu = {s: {"ts": 100.0 + 0.5 * (s + 1), "step_ms": 500.0} for s in range(1, 11)}
    gpu[10]["ts"] = 100.0 + 0.5 * 10
    assert seconds_per_step(gpu, 0 + 2, 10) == pytest.approx(0.5)
    stamps = {s: {k: v for k, v in e.items() if k != "step_ms"} for s, e in gpu.items()}
    assert seconds_per_step(stamps, 2, 10) == pytest.approx(0.4375)
    gpu[6].pop("step_ms")  # one step without a GPU time: the whole window falls back to the timestamps
    assert seconds_per_step(gpu, 2, 10) == pytest.approx(0.4375)
    del gpu[7]  # no event for a step (logging_steps > 1): the same
    assert seconds_per_step(gpu, 2, 10) == pytest.approx(0.4375)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run through the device tool)")
def test_a_step_made_longer_on_the_gpu_shows_in_its_own_time(task_model_dir, task_rows, tmp_path, monkeypatch):
    """Step 4 queues a spin of known length on the GPU before its work: its `step_ms` holds the spin, and its
    neighbours' do not, however late the host read it back. A tiny model's step is host-bound: its usual time is the
    host's, and the spin runs while the host queues step 4, so step 4 takes the spin plus its own GPU work, which is
    at most the usual step."""
    from worker.train.trainer import Trainer

    spin_cycles = 1_000_000_000  # ~0.5 s, far above a tiny model's step
    spin = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    queue_step = Trainer.train_step

    def step_with_spin(self, batch):
        if batch.step == 3:  # the 4th step, as reported; the spin timed where it runs (its cycles take as long as
            spin[0].record()  # the clock of that moment makes them: 0.95× a spin timed before the run, once)
            torch.cuda._sleep(spin_cycles)
            spin[1].record()
        return queue_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step_with_spin)
    train, _, _ = task_rows
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FTW_EVENTS", str(run_dir / "events.jsonl"))
    cfg = base_config(task_model_dir, max_steps=8, save_strategy="no", optimizer="adamw_torch_fused")
    assert run_inprocess(cfg, run_dir, write_cache(tmp_path / "cache", train[:64])) == 0
    times = {e["step"]: e["step_ms"] for e in events(run_dir) if "loss" in e and "event" not in e}
    spin[1].synchronize()
    spin_ms = spin[0].elapsed_time(spin[1])
    assert sorted(times) == list(range(1, 9)) and all(ms > 0 for ms in times.values())
    usual = statistics.median(times[s] for s in (2, 3, 5, 6, 7, 8))
    assert usual < spin_ms / 4, times
    assert 0.95 * spin_ms <= times[4] <= spin_ms + 1.5 * usual, (spin_ms, times)
    assert max(times[s] for s in (3, 5)) < usual + spin_ms / 4, (spin_ms, times)


def test_the_real_paths_busy_share_is_its_timed_steps_own():
    """The bare loop samples the GPU over its timed steps alone; the real path's figure for the same window comes
    from its step events (warmup steps that compiled kernels idle the GPU and would lower a whole-run median)."""
    events = {s: {"gpu_busy_pct": 20.0 if s <= 4 else 80.0 + s} for s in range(1, 11)}
    assert timed_busy_share(events, 4, 10) == {"gpu_busy_share": 0.875}  # steps 5..10: 85..90, median 87.5
    assert timed_busy_share({s: {} for s in range(1, 11)}, 4, 10) == {}  # a driver that reports no utilization

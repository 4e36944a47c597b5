"""The kernel warm-up beside preprocessing and the model's download (worker/job/warmup.py): it runs where the
first step compiles kernels, finishes inside the download's time, goes on beside the train stage's model loading,
is waited for while it records or compiles side by side and otherwise stopped (with everything it started) when that
model is ready, before the first step, and a warm-up that cannot run costs the job nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from schemas.config import TrainingConfig
from schemas.secrets import Redactor
from tests.job.conftest import example_job
from tests.job.test_prefetch import CONFIG, hub_model  # noqa: F401  # the fixture: the tiny model on the local Hub
from tests.processes import left_behind
from worker.job import warmup
from worker.job.pipeline import run_job
from worker.job.warmup import KernelWarmup, compiles_kernels, warmup_argv
from worker.train import warmup_lock


def warmup_child(name: str, cmdline: str) -> bool:
    """The warm-up's process: a child forked from the stage template is named after its module."""
    return "worker.train.wa" in f"{name} {cmdline}"


def cfg(**kw) -> TrainingConfig:
    return TrainingConfig.model_validate({"base_model": "org/model", "learning_rate": 1e-4, **kw})


def test_it_runs_where_the_first_step_compiles_kernels():
    assert compiles_kernels(cfg(), gpus=1)  # ftw's Triton kernels
    assert not compiles_kernels(cfg(use_kernels=False), gpus=1)
    assert compiles_kernels(cfg(use_kernels=False, torch_compile=True), gpus=1)
    assert not compiles_kernels(cfg(), gpus=0)  # the CPU runs no Triton kernel
    assert compiles_kernels(cfg(torch_compile=True), gpus=0)  # Inductor's, on the CPU
    assert not compiles_kernels(cfg(torch_compile="auto"), gpus=0)  # auto compiles on a GPU only


def test_it_is_not_started_when_off_useless_or_blind(tmp_path):
    def argv(config: TrainingConfig, gpus: int = 1, **env: str) -> list[str] | None:
        return warmup_argv(config, tmp_path / "config.json", env, gpus)

    assert argv(cfg()) == [sys.executable, "-m", "worker.train.warmup", str(tmp_path / "config.json")]
    assert argv(cfg(), FTW_KERNEL_WARMUP="0") is None
    assert argv(cfg(), gpus=0) is None
    assert argv(cfg(base_model="s3://bucket/model")) is None  # no config to read before the train stage fetches it


def test_stopping_it_kills_it_and_keeps_its_output_redacted(tmp_path):
    script = "import time; print('compiling with secret-token-123', flush=True); time.sleep(120)"
    started = KernelWarmup(
        [sys.executable, "-c", script],
        dict(os.environ),
        None,
        tmp_path / "warmup.log",
        Redactor(["secret-token-123"]),
        tmp_path,
    )
    deadline = time.monotonic() + 30
    while not (started.child and started.child.output) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = started.child.proc.pid
    started.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    log = (tmp_path / "warmup.log").read_text()
    assert "compiling with" in log and "secret-token-123" not in log


@pytest.mark.slow
def test_the_kernels_compile_while_the_model_downloads(demo_volume, hub_server, hub_model):  # noqa: F811
    """On the CPU, torch_compile is what compiles (its eager backend here: the trace without Inductor's
    minutes); the slowed download leaves the warm-up its time, and it ends before the train stage starts."""
    endpoint, token = hub_server
    hub = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(demo_volume / "hf-home")}
    config = {**CONFIG, "base_model": hub_model, "torch_compile": True, "torch_compile_backend": "eager"}
    logs = demo_volume / "runs" / "warm" / "logs"
    seen = {"started": False}

    def warmed() -> bool:
        """Whether the warm-up child has run and ended."""
        running = bool(left_behind(warmup_child))
        seen["started"] |= running
        return seen["started"] and not running

    # the weights (1.6 MiB) take ~6 s, and trickle until the warm-up has ended (≤ ~100 s): a slow download,
    # however long the warm-up takes on a loaded machine
    hub_server.file_bytes_per_s, hub_server.file_gate = 256 * 1024, warmed
    try:
        result = run_job({"input": example_job(run_id="warm", config=config)}, env={**os.environ, **hub})
    finally:
        hub_server.file_bytes_per_s, hub_server.file_gate = None, None
    assert result["status"] == "completed", result
    warm_log = (logs / "warmup.log").read_text()
    assert "kernel warm-up done" in warm_log and token not in warm_log
    # it had ended before the train child's model was ready: its first step neither stopped it nor waited for it
    assert "kernel warm-up" not in (logs / "train" / "attempt-1" / "stderr.log").read_text()
    assert not left_behind(warmup_child) and not warmup_lock.lock_path(logs.parent).exists()


def test_it_compiles_beside_the_models_loading_and_the_first_step_waits_for_its_end(demo_volume, monkeypatch):
    """The warm-up goes on while the train stage starts and loads its model; once the model is ready the train child
    stops it and starts its first step only when it has ended (here a stand-in that would compile for ever, holding
    the warm-up's lock as the real one does)."""
    run, events, lines, train_log = job_beside(demo_volume, monkeypatch, "beside", stand_in(warmup_lock.COMPILING))
    at = marks(events)
    compiled = [float(line.split()[1]) for line in lines if line.startswith("compiling")]
    assert max(compiled) > at["loading"]  # it ran beside the model's loading, not stopped when the stage started
    assert at["ready"] - 0.1 < max(compiled) < at["first_step"]  # until the model was ready; gone before step 1
    assert "was still compiling: stopped in" in train_log  # the train child killed the stand-in itself
    assert not any(e.get("event") == "waiting" for e in events)  # and did not wait for it
    assert not warmup_lock.lock_path(run).exists() and not left_behind(lambda name, cmd: "warmup_lock" in cmd)


def test_the_first_step_waits_for_a_warmup_compiling_side_by_side(demo_volume, monkeypatch):
    """A warm-up whose kernels compile in worker processes when the model is ready is waited for, not killed: the
    compiles end sooner than the first step would run them one after another (here a stand-in that compiles on
    for a second after the train child's `ready` event, in that phase, and then exits as done)."""
    run, events, lines, train_log = job_beside(
        demo_volume, monkeypatch, "waited", stand_in(warmup_lock.SIDE_BY_SIDE, 1.0)
    )
    at = marks(events)
    compiled = [float(line.split()[1]) for line in lines if line.startswith("compiling")]
    assert at["ready"] + 0.9 < max(compiled) < at["first_step"]  # it went on after `ready`; step 1 came after it
    assert lines[-1] == "kernel warm-up done (a stand-in)"  # it finished, neither the train child nor the job killed it
    assert "for the kernel warm-up (side-by-side), before the first step" in train_log
    shown = [e for e in events if e.get("event") == "waiting"]  # the user sees why the first step waits
    assert len(shown) == 1 and "waits for the kernel warm-up's compiles side by side" in shown[0]["message"]
    assert at["ready"] <= shown[0]["ts"] < at["first_step"]
    assert "stopped in" not in train_log and not warmup_lock.lock_path(run).exists()


def stand_in(phase: str, after_ready_s: float | None = None) -> str:
    """A stand-in warm-up (Python source; argv[1]: the run's config.json) that holds the run's lock in `phase`, as the
    real one does, and prints timestamps: for ever, or until `after_ready_s` after the train child's `ready` event,
    then exits as done."""
    return (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from worker.train import warmup_lock\n"
        "run = Path(sys.argv[1]).parent\n"
        "events = run / 'logs' / 'train' / 'attempt-1' / 'events.jsonl'\n"
        f"after_ready = {after_ready_s!r}\n"
        f"with warmup_lock.holding(run, {phase!r}):\n"
        "    end = float('inf')\n"
        "    while time.time() < end:\n"
        "        print(f'compiling {time.time():.4f}', flush=True)\n"
        "        ready = after_ready is not None and events.exists() and '\"ready\"' in events.read_text()\n"
        "        end = time.time() + after_ready if ready and end == float('inf') else end\n"
        "        time.sleep(0.01)\n"
        "print('kernel warm-up done (a stand-in)', flush=True)\n"
    )


def job_beside(demo_volume: Path, monkeypatch, run_id: str, stand_in: str) -> tuple[Path, list[dict], list[str], str]:
    """The demo job with `stand_in` (Python source; argv[1]: the run's config.json) as its kernel warm-up: the run
    folder, the train child's events, the warm-up's log lines, the train log."""
    monkeypatch.setattr(warmup, "warmup_argv", lambda cfg, path, env, gpus: [sys.executable, "-c", stand_in, str(path)])
    result = run_job({"input": example_job(run_id=run_id, config=CONFIG)}, env=dict(os.environ))
    assert result["status"] == "completed", result
    run = demo_volume / "runs" / run_id
    train_logs = run / "logs" / "train" / "attempt-1"
    events = [json.loads(x) for x in (train_logs / "events.jsonl").read_text().splitlines()]
    lines = (run / "logs" / "warmup.log").read_text().splitlines()
    return run, events, lines, (train_logs / "stderr.log").read_text()


def marks(events: list[dict]) -> dict[str, float]:
    """When the train child began loading, had its model ready, and had done its first step."""
    return {e["event"]: e["ts"] for e in events if e.get("event") in ("loading", "ready", "first_step")}


def test_the_train_child_ends_a_warmup_that_still_runs_and_waits_no_longer_than_its_limit(tmp_path):
    holder = hold(tmp_path, warmup_lock.COMPILING, 120)
    try:
        lock = warmup_lock.lock_path(tmp_path)
        pid, phase = lock.read_text().split()
        assert (pid, phase) == (str(holder.pid), "compiling") and not lock.is_relative_to(tmp_path)  # on this machine
        lock.write_text("99999999 compiling")  # a pid that is no process: it cannot be ended
        ended = warmup_lock.end_warmup(tmp_path, limit_s=0.2)
        assert ended.killed and 0.2 <= ended.seconds < 5  # so the limit ends the wait
        assert holder.poll() is None
        lock.write_text(f"{pid} compiling")
        ended = warmup_lock.end_warmup(tmp_path)
        assert ended.killed and ended.seconds < 5  # killed, and its lock gone with it
        assert holder.wait(timeout=10) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    assert warmup_lock.end_warmup(tmp_path).seconds < 0.1  # a free lock: no wait
    assert warmup_lock.end_warmup(tmp_path / "no-run") == (0.0, False, "")  # no warm-up, no wait


def test_the_train_child_waits_out_the_recording_and_the_compiles_side_by_side(tmp_path):
    """Both phases end sooner than the first step would compile the kernels itself: it waits for the warm-up to finish
    (here 0.4 s recording, then 0.6 s compiling in worker processes) instead of killing it."""
    holder = hold(tmp_path, warmup_lock.RECORDING, 0.4, warmup_lock.SIDE_BY_SIDE, 0.6)
    told = []
    try:
        ended = warmup_lock.end_warmup(tmp_path, on_wait=told.append)
        assert not ended.killed and ended.phase == warmup_lock.SIDE_BY_SIDE and 0.7 < ended.seconds < 10
        assert told == [warmup_lock.RECORDING]  # the user is told once, as the wait begins
        assert holder.wait(timeout=10) == 0  # it finished its work
    finally:
        holder.kill()
        holder.wait()


def test_past_its_patience_a_phase_is_not_waited_out(tmp_path, monkeypatch):
    monkeypatch.setitem(warmup_lock.PATIENCE_S, warmup_lock.SIDE_BY_SIDE, 0.3)
    holder = hold(tmp_path, warmup_lock.RECORDING, 0.2, warmup_lock.SIDE_BY_SIDE, 120)
    try:
        ended = warmup_lock.end_warmup(tmp_path)
        assert ended.killed and ended.phase == warmup_lock.SIDE_BY_SIDE and 0.45 < ended.seconds < 10
        assert holder.wait(timeout=10) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()


def hold(run_dir: Path, *phases: str | float) -> subprocess.Popen:
    """A stand-in warm-up holding the run's lock through `phases` (name, seconds, name, seconds, ...), then exiting 0;
    returned once it holds the lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), *map(str, phases)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
        start_new_session=True,  # as the warm-up runs, leading its own session
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_where_the_filesystem_cannot_lock_neither_side_fails(tmp_path, monkeypatch, caplog):
    """A filesystem without locks costs the overlap's guard, never the job: the warm-up runs unlocked (the
    orchestrator stops it at the first step) and the train child starts its first step at once."""

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(warmup_lock.fcntl, "flock", no_locks)
    with warmup_lock.holding(tmp_path):
        assert warmup_lock.end_warmup(tmp_path).seconds < 1
    assert "no lock" in caplog.text and "cannot be read" in caplog.text
    warmup_lock.remove(tmp_path)
    warmup_lock.lock_path(tmp_path).mkdir()  # a lock that cannot even be opened
    try:
        assert warmup_lock.end_warmup(tmp_path).seconds == 0.0 and "cannot be opened" in caplog.text
    finally:
        warmup_lock.lock_path(tmp_path).rmdir()


HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from worker.train import warmup_lock\n"
    "phases = sys.argv[2:]\n"
    "with warmup_lock.holding(Path(sys.argv[1]), phases[0]) as lock:\n"
    "    print('held', flush=True)\n"
    "    for name, seconds in zip(phases[::2], phases[1::2]):\n"
    "        lock.phase(name)\n"
    "        time.sleep(float(seconds))\n"
)

"""A vLLM engine that starts slowly, through `ftw run`: the train child says it is alive while it waits (the
supervisor's limits.no_progress_s does not stop it), and a start past FTW_VLLM_START_TIMEOUT_S fails with the
engine's own log tail and the variable to raise; no process of the engine is left. The engine is a stand-in
(FTW_VLLM_PYTHON names a script that answers vLLM's build probe, prints a line and never answers /health),
so that the waits are short and the start's end is known; one job for the module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.train.vllm_helpers import engine_gone, ftw_run, grpo_job, result_of, train_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NO_PROGRESS_S = 20  # the heartbeat (every 10 s) keeps the train child under it
# past NO_PROGRESS_S: without the heartbeat the supervisor stops the job first; and past the beat at 30 s
# (beats at 0, 10, 20, 30 s), the first one later than NO_PROGRESS_S; no longer, as the job waits all of it
START_TIMEOUT_S = 34
ENGINE_LINE = "stand-in vLLM: loading weights, slowly"

STAND_IN = f"""#!{sys.executable}
import os, subprocess, sys, time
if sys.argv[1] == "-c":  # worker/serve/engine_defaults.py's probe: a GPU build of vLLM is here
    print("gpu")
    sys.exit(0)
with open(os.environ["STAND_IN_PID_FILE"], "w") as f:
    f.write(str(os.getpid()))
subprocess.Popen(["sleep", "600"])  # a worker of the engine, in its process group
print({ENGINE_LINE!r}, flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def slow_start(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """The job's result, its train events and the stand-in engine's pid file."""
    volume = tmp_path_factory.mktemp("volume")
    engine = volume / "stand-in-python"
    engine.write_text(STAND_IN)
    engine.chmod(0o755)
    pid_file = volume / "stand-in.pid"
    job = grpo_job(
        volume, tiny_model_dir, "vllm-slow-start", "length_bonus", steps=2, limits={"no_progress_s": NO_PROGRESS_S}
    )
    env = {
        "FTW_VLLM_PYTHON": str(engine),
        "FTW_VLLM_START_TIMEOUT_S": str(START_TIMEOUT_S),
        "STAND_IN_PID_FILE": str(pid_file),
    }
    result = result_of(ftw_run(volume, tiny_model_dir, job, env))
    return {"result": result, "events": train_events(volume / "runs" / "vllm-slow-start"), "pid_file": pid_file}


def test_the_train_child_reports_liveness_while_the_engine_starts(slow_start):
    error = slow_start["result"]["error"]
    assert error["code"] != "no_progress", error  # what a silent wait of START_TIMEOUT_S ended with
    beats = [e for e in slow_start["events"] if e.get("event") == "vllm_starting"]
    waited = [e["waited_s"] for e in beats]
    assert waited == sorted(waited) and waited[-1] > NO_PROGRESS_S, waited
    assert all(later - earlier < NO_PROGRESS_S for earlier, later in zip(waited, waited[1:], strict=False))
    assert f"of FTW_VLLM_START_TIMEOUT_S={START_TIMEOUT_S}" in beats[-1]["message"]


def test_a_start_past_the_timeout_fails_with_the_engines_log_and_the_variable_to_raise(slow_start):
    result = slow_start["result"]
    assert result["status"] == "failed", result
    error = result["error"]
    assert error["code"] == "infra" and error["stage"] == "train", error
    assert error["message"] == (
        f"vLLM for trl.use_vllm did not start: the vllm engine did not answer /health within {START_TIMEOUT_S}s"
    )
    assert f"raise FTW_VLLM_START_TIMEOUT_S (now {START_TIMEOUT_S} s)" in error["hint"]
    assert str(Path("vllm-slow-start") / "vllm" / "engine.log") in error["hint"]
    assert ENGINE_LINE in error["log_tail"]  # the engine's own words, not only the train child's


def test_no_process_of_the_engine_is_left(slow_start):
    assert engine_gone(slow_start["pid_file"], timeout_s=10)


def test_sigterm_while_the_engine_starts_stops_the_job_at_once_and_the_engine_with_it(tiny_model_dir, tmp_path):
    """Preemption before the first step: nothing to save, so the train child exits 75 at once (with a
    `preempted` event at step 0) instead of waiting out the engine's start and the supervisor's grace
    period, which ends in SIGKILL; the engine goes with it."""
    import signal
    import time

    engine = tmp_path / "stand-in-python"
    engine.write_text(STAND_IN)
    engine.chmod(0o755)
    pid_file = tmp_path / "stand-in.pid"
    job = grpo_job(tmp_path, tiny_model_dir, "vllm-preempted", "length_bonus", steps=2)
    env = {"FTW_VLLM_PYTHON": str(engine), "FTW_VLLM_START_TIMEOUT_S": "600", "STAND_IN_PID_FILE": str(pid_file)}
    proc = ftw_run(tmp_path, tiny_model_dir, job, env)
    deadline = time.monotonic() + 300
    while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), "the stand-in engine never started"
    proc.send_signal(signal.SIGTERM)
    result = result_of(proc)
    assert result["status"] == "preempted", result
    events = train_events(tmp_path / "runs" / "vllm-preempted")
    assert any(e.get("event") == "preempted" and e.get("step") == 0 for e in events), events[-3:]
    assert engine_gone(pid_file, timeout_s=10)

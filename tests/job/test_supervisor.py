"""The supervisor against real child processes: logs as bytes, signals, limits, typed failures —
every test twice: children started as fresh interpreters, and forked from the stage template
(worker/job/template.py), which must keep the same contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from schemas.secrets import Redactor
from tests.conftest import pid_alive, wait_gone
from worker import errors
from worker.job.supervisor import Stage, StopSignal, run_stage, stage_failure
from worker.job.template import StageTemplate

SECRET = "hf_SuperSecretToken123456"
REPO = Path(__file__).resolve().parents[2]
LAUNCH: dict[str, StageTemplate | None] = {"template": None}


@pytest.fixture(scope="module")
def template():
    started = StageTemplate({**os.environ, "PYTHONPATH": str(REPO)})
    assert started.wait_ready(), "the stage template did not start"
    yield started
    started.close()


@pytest.fixture(params=["fresh", "template"], autouse=True)
def launch(request):
    """Which way `child` stages start in this test."""
    LAUNCH["template"] = request.getfixturevalue("template") if request.param == "template" else None
    yield request.param
    LAUNCH["template"] = None


def child(tmp_path: Path, body: str, **kw) -> Stage:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return Stage(
        "train",
        [sys.executable, str(script)],
        env,
        log_dir,
        grace_s=kw.pop("grace_s", 5.0),
        template=LAUNCH["template"],
        **kw,
    )


def forked_from_template(run) -> bool:
    return any("forked from the template" in line for line in run.stderr.tail(200))


def test_the_child_is_forked_from_the_template_when_there_is_one(tmp_path, launch):
    stage = child(
        tmp_path,
        """
        import os, sys
        print(os.getpid(), os.getpgid(0), os.environ["MARK"], "torch" in sys.modules, flush=True)
    """,
    )
    stage.env["MARK"] = "from-this-stage"
    run = run_stage(stage, StopSignal(), Redactor([]))
    pid, pgid, mark, preimported = run.last_stdout_line().split()
    assert run.returncode == 0 and int(pid) == run.pid == int(pgid)  # its own process group
    assert mark == "from-this-stage"  # the stage's environment, not the template's
    assert forked_from_template(run) == (launch == "template") and preimported == str(launch == "template")


def test_carriage_return_progress_and_huge_line_do_not_stall(tmp_path):
    stage = child(
        tmp_path,
        """
        import sys
        for i in range(2000):
            sys.stderr.write(f"\\rprogress {i}/2000"); sys.stderr.flush()
        sys.stdout.write("x" * 3_000_000); sys.stdout.flush()
        print()
        print('{"cache_dir": "/somewhere"}')
    """,
    )
    run = run_stage(stage, StopSignal(), Redactor([]))
    assert run.returncode == 0 and stage_failure(run) is None
    assert run.last_stdout_line() == '{"cache_dir": "/somewhere"}'
    assert "progress 1999/2000" in run.stderr.tail(1)[0]
    assert (stage.log_dir / "stdout.log").stat().st_size > 3_000_000


def test_secrets_are_redacted_even_when_split_across_writes(tmp_path):
    stage = child(
        tmp_path,
        f"""
        import sys, time
        s = {SECRET!r}
        sys.stdout.write("token=" + s[:7]); sys.stdout.flush(); time.sleep(0.3)
        sys.stdout.write(s[7:] + " done\\n"); sys.stdout.flush()
        raise SystemExit("bad token " + s)
    """,
    )
    run = run_stage(stage, StopSignal(), Redactor([SECRET]))
    failure = stage_failure(run)
    assert isinstance(failure, errors.ChildCrash)
    for f in stage.log_dir.iterdir():
        assert SECRET.encode() not in f.read_bytes(), f
        assert SECRET[:12].encode() not in f.read_bytes(), f
    assert "token=*** done" in (stage.log_dir / "stdout.log").read_text()
    assert SECRET not in failure.log_tail and "bad token ***" in failure.log_tail


def test_sigterm_gives_grace_to_checkpoint_then_preempted(tmp_path, monkeypatch):
    stage = child(
        tmp_path,
        """
        import signal, sys, time
        from worker.events import emit
        def on_term(*_):
            time.sleep(0.5)                       # "saving a checkpoint"
            open("saved", "w").write("ok")
            sys.exit(75)
        signal.signal(signal.SIGTERM, on_term)
        for step in range(1000):
            emit({"stage": "train", "step": step, "loss": 1.0})
            time.sleep(0.05)
    """,
    )
    monkeypatch.chdir(tmp_path)
    stop, events = StopSignal(), []

    def preempt_after_first_steps(event: dict) -> None:  # the handler is installed before the first emit
        events.append(event)
        if event["step"] >= 1:
            stop.request("preempted")

    run = run_stage(stage, stop, Redactor([]), preempt_after_first_steps)
    failure = stage_failure(run)
    assert isinstance(failure, errors.Preempted) and failure.retryable
    assert (tmp_path / "saved").read_text() == "ok"
    assert events and events[0]["step"] == 0 and all("loss" in e for e in events)


def test_cancel_kills_a_child_that_ignores_sigterm_and_its_grandchildren(tmp_path):
    stage = child(
        tmp_path,
        """
        import signal, subprocess, sys, time
        from worker.events import emit
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        g = subprocess.Popen([sys.executable, "-c", ignore + "print('ignoring', flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE)
        g.stdout.readline()
        print(g.pid, flush=True)
        emit({"stage": "train", "step": 1})  # both now ignore SIGTERM: the test cancels here
        time.sleep(600)
    """,
        grace_s=1.0,
        time_limit_s=60,
    )  # no event: a StageTimeout in a minute, not a 600 s hang
    stop, cancelled_at = StopSignal(), []

    def cancel(event: dict) -> None:
        cancelled_at.append(time.monotonic())
        stop.request("cancelled")

    run = run_stage(stage, stop, Redactor([]), cancel)
    assert time.monotonic() - cancelled_at[0] < 1.0 + 5  # the grace, then the kill
    assert isinstance(stage_failure(run), errors.Cancelled)
    grandchild = int(run.stdout.tail()[0])
    assert not pid_alive(run.pid) and not pid_alive(grandchild)


def test_time_limit_and_no_progress_watchdog(tmp_path):
    stage = child(
        tmp_path,
        "import time\nwhile True:\n    print('tick', flush=True); time.sleep(0.1)\n",
        time_limit_s=3.0,
        grace_s=0.5,
    )
    failure = stage_failure(run_stage(stage, StopSignal(), Redactor([])))
    assert isinstance(failure, errors.StageTimeout) and not isinstance(failure, errors.NoProgress)
    assert "tick" in failure.log_tail

    quiet = child(
        tmp_path, "import time\nprint('start', flush=True)\ntime.sleep(600)\n", no_progress_s=1.0, grace_s=0.5
    )
    started = time.monotonic()
    failure = stage_failure(run_stage(quiet, StopSignal(), Redactor([])))
    assert isinstance(failure, errors.NoProgress) and time.monotonic() - started < 10


def test_error_file_becomes_the_typed_error(tmp_path):
    stage = child(
        tmp_path,
        """
        from worker.errors import DataError
        from worker.events import run_child
        def main():
            raise DataError("data.jsonl line 3: missing field 'messages'", "add the field or set field_messages")
        run_child(main)
    """,
    )
    failure = stage_failure(run_stage(stage, StopSignal(), Redactor([])))
    assert type(failure) is errors.DataError
    assert "line 3" in failure.message and failure.hint.startswith("add the field") and failure.stage == "train"


def test_an_errors_own_log_tail_reaches_the_failure(tmp_path):
    """An error that quotes another process's log (the vLLM engine's) keeps it: the child's own output does not
    have it; a long one keeps its end."""
    stage = child(
        tmp_path,
        """
        from worker.errors import InfraError
        from worker.events import run_child
        def main():
            print("child's own line", flush=True)
            raise InfraError("the engine did not start", "raise X", log_tail="x" * 20_000 + "engine: out of memory")
        run_child(main)
    """,
    )
    failure = stage_failure(run_stage(stage, StopSignal(), Redactor([])))
    assert type(failure) is errors.InfraError and failure.message == "the engine did not start"
    assert failure.log_tail.endswith("engine: out of memory") and len(failure.log_tail) < 10_000


def test_a_huge_error_message_of_a_child_is_clipped(tmp_path):
    """A child's message may quote a user's value (a 9 MB field name); the job's failure stays short."""
    stage = child(
        tmp_path,
        """
        from worker.errors import DataError
        from worker.events import run_child
        def main():
            raise DataError("field " + "f" * 5_000_000 + " is missing", "set field_messages")
        run_child(main)
    """,
    )
    failure = stage_failure(run_stage(stage, StopSignal(), Redactor([])))
    assert (
        type(failure) is errors.DataError
        and len(failure.message) < 5000
        and "(5,000,017 characters)" in failure.message
    )


def test_kill_9_is_a_crash_with_log_tail(tmp_path):
    stage = child(
        tmp_path,
        """
        import os, signal
        print("step 7 loss 1.23", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
    )
    failure = stage_failure(run_stage(stage, StopSignal(), Redactor([])))
    assert type(failure) is errors.ChildCrash and failure.retryable
    assert "SIGKILL" in failure.message and "step 7 loss 1.23" in failure.log_tail


@pytest.mark.parametrize(
    "text, cls",
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", errors.OutOfMemory),
        ("NCCL error: unhandled system error", errors.DistributedError),
    ],
)
def test_oom_and_nccl_are_recognised_from_the_log(tmp_path, text, cls):
    stage = child(tmp_path, f"import sys\nprint({text!r}, file=sys.stderr)\nsys.exit(1)\n")
    assert type(stage_failure(run_stage(stage, StopSignal(), Redactor([])))) is cls


def test_kill_9_of_the_supervisor_sends_the_stage_sigterm_so_it_can_save(tmp_path, launch):
    """No orphaned training run: the child hears SIGTERM (its save-and-exit path) when the worker is SIGKILLed."""
    marker = tmp_path / "got-sigterm"
    stage_script = tmp_path / "stage.py"
    stage_script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, time
        def on_term(*_):
            open({str(marker)!r}, "w").write("checkpoint saved")
            sys.exit(75)
        signal.signal(signal.SIGTERM, on_term)
        open({str(tmp_path / "stage.pid.tmp")!r}, "w").write(str(os.getpid()))
        os.replace({str(tmp_path / "stage.pid.tmp")!r}, {str(tmp_path / "stage.pid")!r})  # seen whole or not at all
        time.sleep(600)
    """)
    )
    supervisor_script = tmp_path / "supervisor.py"
    supervisor_script.write_text(
        textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from schemas.secrets import Redactor
        from worker.job.supervisor import Stage, StopSignal, run_stage
        from worker.job.template import StageTemplate
        logs = Path({str(tmp_path / "logs")!r}); logs.mkdir()
        template = StageTemplate(dict(os.environ)) if {launch == "template"} else None  # this supervisor's own
        stage = Stage("train", [sys.executable, {str(stage_script)!r}], dict(os.environ), logs, grace_s=5.0,
                      template=template)
        run_stage(stage, StopSignal(), Redactor([]))
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    supervisor = subprocess.Popen([sys.executable, str(supervisor_script)], env=env)
    pid_file, stage_pid = tmp_path / "stage.pid", None
    try:
        deadline = time.monotonic() + 180  # a template imports torch & co. first
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.exists(), "the stage never started"
        stage_pid = int(pid_file.read_text())
        supervisor.kill()
        supervisor.wait()
        assert wait_gone(stage_pid, 10), "the stage outlived its SIGKILLed supervisor"
        assert marker.read_text() == "checkpoint saved"
    finally:  # a failing run leaves no process behind
        supervisor.kill()
        supervisor.wait()
        if stage_pid is not None and pid_alive(stage_pid):
            os.kill(stage_pid, signal.SIGKILL)


def test_a_fresh_template_forks_preprocessing_before_the_train_stages_imports(tmp_path, launch):
    """A fresh worker's template listens once what preprocessing imports is in, forks `python -m worker.data` at
    once and imports the train stage's modules beside it; any other stage waits for all of them."""
    if launch == "fresh":
        pytest.skip("the template's own order")
    from worker.job.template_server import LATER

    started = StageTemplate({**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert started.wait_ready()
        logs = tmp_path / "logs"
        logs.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "worker.data", str(tmp_path / "no-such-config.json")]
        preprocess = run_stage(Stage("preprocess", argv, env, logs, template=started), StopSignal(), Redactor([]))
        assert preprocess.returncode != 0  # no config: it fails, as forked, after the template line
        assert "what preprocessing imports was imported there" in "\n".join(preprocess.stderr.tail(200))
        script = tmp_path / "train.py"
        script.write_text(f"import sys\nprint(all(m in sys.modules for m in {list(LATER)!r}), flush=True)\n")
        train = run_stage(
            Stage("train", [sys.executable, str(script)], env, logs, template=started), StopSignal(), Redactor([])
        )
        assert train.returncode == 0 and train.last_stdout_line() == "True"
        assert "torch, transformers, datasets, peft were imported there" in "\n".join(train.stderr.tail(200))
    finally:
        started.close()


def test_a_stage_that_stopped_waiting_for_the_template_is_not_forked_as_well(tmp_path, launch, monkeypatch):
    """A stage the template keeps waiting past the orchestrator's patience starts as a fresh process, and the
    template, once its imports are in, does not fork that request too."""
    if launch == "fresh":
        pytest.skip("the template's own order")
    import worker.job.template as template_module

    started = StageTemplate({**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert started.wait_ready()
        monkeypatch.setattr(template_module, "READY_TIMEOUT_S", 0.1)  # shorter than the train stage's imports
        runs = tmp_path / "runs.txt"
        stage = child(tmp_path, f"import os\nwith open({str(runs)!r}, 'a') as f: f.write(f'{{os.getpid()}}\\n')\n")
        stage.template = started
        impatient = run_stage(stage, StopSignal(), Redactor([]))
        assert impatient.returncode == 0 and "starting a fresh process" in "\n".join(impatient.stderr.tail(200))
        monkeypatch.setattr(template_module, "READY_TIMEOUT_S", 300.0)
        patient = run_stage(stage, StopSignal(), Redactor([]))  # forked once the template's imports are in
        assert patient.returncode == 0 and forked_from_template(patient)
        assert len(runs.read_text().splitlines()) == 2  # the first request was not forked after all
    finally:
        started.close()

"""tests/processes.left_behind: what the "no process left" tests count, with `make test`'s other worker running
jobs of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

from tests.conftest import REPO
from tests.processes import left_behind

PYTHON = sys.executable
# a sleeper's tag is its last argument: the code that starts one names the tag too, but never ends with it
FOUND = (
    "import json; from tests.processes import left_behind; "
    "print(json.dumps([p.pid for p in left_behind(lambda _, c: c.endswith({!r}))]))"
)


def _sleeper(tag: str) -> list[str]:
    return [PYTHON, "-c", "import time; time.sleep(60)", tag]


def _spawning(argv: list[str], then: str = "") -> str:
    """Python that starts `argv` in a child process of its own, then runs `then`."""
    return f"import subprocess; subprocess.Popen({argv!r}); {then}"


def _tagged(tag: str):
    return lambda _, cmdline: cmdline.endswith(" " + tag)


def _running(tag: str, wait_s: float = 20) -> list[psutil.Process]:
    deadline = time.monotonic() + wait_s
    while True:
        found = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[-1] == tag]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _kill(tag: str) -> None:
    for p in _running(tag, wait_s=0):
        p.kill()


def test_a_child_of_this_process_counts():
    child = subprocess.Popen(_sleeper("ftw-left-behind-child"))
    try:
        assert _running("ftw-left-behind-child")
        assert [p.pid for p in left_behind(_tagged("ftw-left-behind-child"))] == [child.pid]
    finally:
        child.kill()
        child.wait()


def test_an_orphan_counts():
    subprocess.run([PYTHON, "-c", _spawning(_sleeper("ftw-left-behind-orphan"))], check=True)  # it outlives this
    try:
        (orphan,) = _running("ftw-left-behind-orphan")
        assert [p.pid for p in left_behind(_tagged("ftw-left-behind-orphan"))] == [orphan.pid]
    finally:
        _kill("ftw-left-behind-orphan")


def test_the_other_workers_child_does_not_count():
    """A stand-in for pytest's main process starts two workers: one runs a job (a sleeping child), the other
    looks for leftovers while it runs."""
    tag = "ftw-left-behind-sibling"
    worker_with_a_job = _spawning(_sleeper(tag), then="import time; time.sleep(60)")
    main = (
        "import subprocess, time\n"
        f"worker = subprocess.Popen([{PYTHON!r}, '-c', {worker_with_a_job!r}], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "time.sleep(1.5)\n"
        f"print(subprocess.run([{PYTHON!r}, '-c', {FOUND.format(' ' + tag)!r}], "
        "capture_output=True, text=True, check=True).stdout)\n"
        "worker.kill()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown_as_pytest = ["bash", "-c", f'exec -a "python -m pytest main" {PYTHON} -c "$0"', main]
    try:
        out = subprocess.run(shown_as_pytest, capture_output=True, text=True, check=True, env=env, timeout=60)
        assert _running(tag, wait_s=0)  # it was there to be found
        assert json.loads(out.stdout) == []
    finally:
        _kill(tag)


def test_a_killed_run_leaves_no_s3_server():
    """The tests' rclone S3 server dies with the process that started it, even one killed by SIGKILL (a test
    run stopped by hand, a bench script that crashed): the next run finds no stray server on its machine."""
    starter = (
        "import sys, tempfile, time, pathlib\n"
        "from tests.s3server import running_s3_server\n"
        "with running_s3_server(pathlib.Path(tempfile.mkdtemp()) / 's3') as server:\n"
        "    print(server.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [PYTHON, "-c", starter], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        server = psutil.Process(int(proc.stdout.readline()))
        assert server.is_running() and "rclone" in server.name()
        proc.kill()
        proc.wait()
        assert psutil.wait_procs([server], timeout=10)[1] == [], "rclone outlived the run that started it"
    finally:
        proc.kill()
        proc.wait()

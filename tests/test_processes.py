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
SLEEPER = "import time; time.sleep(60)  # {}"
FOUND = (
    "import json; from tests.processes import left_behind; "
    "print(json.dumps([p.pid for p in left_behind(lambda _, c: {!r} in c)]))"
)


def _spawning(code: str, then: str = "") -> str:
    """Python that starts `code` in a child process of its own, then runs `then`."""
    return f"import subprocess; subprocess.Popen([{PYTHON!r}, '-c', {code!r}]); {then}"


def _tagged(tag: str):
    return lambda _, cmdline: tag in cmdline


def _wait_for(tag: str) -> list[psutil.Process]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [p for p in psutil.process_iter(["cmdline"]) if tag in " ".join(p.info["cmdline"] or [])]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{tag} never started")


def _kill(tag: str) -> None:
    for p in psutil.process_iter(["cmdline"]):
        if tag in " ".join(p.info["cmdline"] or []):
            p.kill()


def test_a_child_of_this_process_counts():
    child = subprocess.Popen([PYTHON, "-c", SLEEPER.format("ftw-left-behind-child")])
    try:
        _wait_for("ftw-left-behind-child")
        assert [p.pid for p in left_behind(_tagged("ftw-left-behind-child"))] == [child.pid]
    finally:
        child.kill()
        child.wait()


def test_an_orphan_counts():
    subprocess.run([PYTHON, "-c", _spawning(SLEEPER.format("ftw-left-behind-orphan"))], check=True)  # outlived
    try:
        (orphan,) = _wait_for("ftw-left-behind-orphan")
        assert [p.pid for p in left_behind(_tagged("ftw-left-behind-orphan"))] == [orphan.pid]
    finally:
        _kill("ftw-left-behind-orphan")


def test_the_other_workers_child_does_not_count():
    """A stand-in for pytest's main process starts two workers: one runs a job (a sleeping child), the other
    looks for leftovers while it runs."""
    worker_with_a_job = _spawning(SLEEPER.format("ftw-left-behind-sibling"), then="import time; time.sleep(60)")
    main = (
        "import subprocess, time\n"
        f"worker = subprocess.Popen([{PYTHON!r}, '-c', {worker_with_a_job!r}], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "time.sleep(1.5)\n"
        f"print(subprocess.run([{PYTHON!r}, '-c', {FOUND.format('ftw-left-behind-sibling')!r}], "
        "capture_output=True, text=True, check=True).stdout)\n"
        "worker.kill()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown_as_pytest = ["bash", "-c", f'exec -a "python -m pytest main" {PYTHON} -c "$0"', main]
    try:
        out = subprocess.run(shown_as_pytest, capture_output=True, text=True, check=True, env=env, timeout=60)
        assert json.loads(out.stdout) == []
        assert _wait_for("ftw-left-behind-sibling")  # it was there to be found
    finally:
        _kill("ftw-left-behind-sibling")

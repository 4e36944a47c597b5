"""README's local rehearsal, run as README shows it, in a fresh copy of the repository.

The two terminals' blocks are read from README.md (so the docs and this test cannot drift) and
run with bash in a copy of the tracked files, its `.venv` the one `make setup` made. Two changes,
both for a shared test machine: port 8000 becomes a free port, and PYTHONPATH points at the copy
(the shared .venv's editable install points at another checkout). The submitted demo job is
followed until it trains (validated, data prepared, model loaded, steps logged: what failed
before); its 120 steps to the end take minutes on a CPU and the rest of the path is
tests/endpoint/test_real_handler.py's.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.s3server import free_port

pytestmark = pytest.mark.slow
ANCHOR = "To rehearse the whole flow locally"


def rehearsal_blocks(readme: str) -> list[str]:
    """The fenced blocks after the anchor sentence, up to the next heading: one per terminal."""
    section = readme[readme.index(ANCHOR) :]
    section = section[: section.index("\n## ")]
    return re.findall(r"```\n(.*?)```", section, re.S)


def fresh_copy(dest: Path) -> Path:
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not src.is_symlink() and not rel.startswith(".venv"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to((REPO / ".venv").resolve())  # what `make setup` made
    return dest


def terminal(block: str, clone: Path, env: dict[str, str]) -> subprocess.Popen:
    """A README block run by bash in the copy, as in a terminal of its own: output as text lines on
    stdout, in a new session (stopped as a group)."""
    return subprocess.Popen(
        ["bash", "-c", block],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )


def read_until(proc: subprocess.Popen, done, timeout_s: float) -> list[str]:
    """proc's output lines until `done(line)`; fails when it exits or the time is up first."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    lines, deadline = [], time.monotonic() + timeout_s
    while not (lines and done(lines[-1])):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        if selector.select(timeout=1):
            lines.append(proc.stdout.readline())
    return lines


def test_the_readme_rehearsal_works_as_shown(tmp_path):
    endpoint_block, submit_block = rehearsal_blocks((REPO / "README.md").read_text())
    assert "make demo-volume" in endpoint_block and "ftw endpoint" in endpoint_block and "ftw submit" in submit_block
    port = str(free_port())
    clone = fresh_copy(tmp_path / "ftw")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BASE_VOLUME", "FTW_", "RUNPOD_", "AWS_", "BUCKET_", "HF_TOKEN", "VIRTUAL_ENV"))
    }
    env.update(PYTHONPATH=str(clone), OMP_NUM_THREADS="2")
    endpoint = terminal(endpoint_block.replace("8000", port), clone, env)
    try:
        read_until(endpoint, lambda line: line.startswith("ftw endpoint listening on"), 300)  # after make demo-volume
        drained: list[str] = []  # the worker logs to this terminal too: keep reading, or it blocks on a full pipe
        threading.Thread(target=lambda: drained.extend(endpoint.stdout), daemon=True).start()
        submit = terminal(submit_block.replace("8000", port), clone, env)
        try:
            lines = read_until(submit, lambda line: line.startswith("train") and " step " in line, 600)
        finally:
            os.killpg(submit.pid, signal.SIGTERM)
            submit.wait(timeout=60)
        assert "invalid" not in "".join(lines).lower()
    finally:
        os.killpg(endpoint.pid, signal.SIGTERM)
        endpoint.wait(timeout=60)

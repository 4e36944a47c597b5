"""The stage template: one pre-imported process per worker that forks the stage children.

Every stage child used to start a fresh interpreter and import torch, transformers, datasets and
peft (~10 s on a small machine, several on a GPU host) — preprocess and train each, every job.
The template pays that once: `python -m worker.job.template_server SOCKET` imports them (and the
stage modules) without touching CUDA, then waits on a Unix socket; it forks the preprocess stage as
soon as what preprocessing imports is in, and imports the train stage's own modules beside it
(worker/job/template_server.py). For each stage the supervisor sends the command line, the full
environment (with the job's secrets: over the socket, never on disk), the working directory and the
write ends of its stdout/stderr pipes (SCM_RIGHTS); the template forks, and the child becomes the
stage: its own session (process group), the pipes as fd 1/2, the environment replaced,
PR_SET_PDEATHSIG armed, its process name set to the module's (it keeps the template's command line),
then `python -m MODULE ARGS` run in place (runpy). CUDA is initialised by the child only, after the
fork (a forked CUDA context is unusable, which is why the template never touches it). The template
reaps the child and sends its exit status back on the same connection, so to the supervisor a
`ForkedChild` is a Popen: pid, poll, wait, returncode — limits, SIGTERM/SIGKILL to the group, logs
and exit codes are unchanged.

Parent death: the template dies with the worker (PR_SET_PDEATHSIG), and each child with the
template, by SIGTERM: a training child saves its step, as with a plain child.

The orchestrator imports only this half (`StageTemplate`, no torch); worker/job/template_server.py
runs in the template process. FTW_STAGE_TEMPLATE=0 turns the template off (every stage a fresh
interpreter); a command the template cannot run in place (torchrun for several GPUs) is always
started fresh.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping

from worker.lifeline import die_with_parent, pid_alive

READY_TIMEOUT_S = 300.0


# ---- the orchestrator's side (no torch) ---------------------------------------------------------
def enabled(env: Mapping[str, str]) -> bool:
    return env.get("FTW_STAGE_TEMPLATE", "1") not in ("0", "false", "no", "off")


def runnable_in_place(argv: list[str]) -> bool:
    """`python -m MODULE ...` or `python SCRIPT.py ...` of this interpreter: what runpy runs in a fork."""
    if len(argv) < 2 or argv[0] != sys.executable:
        return False
    return (argv[1] == "-m" and len(argv) >= 3) or (argv[1].endswith(".py") and not argv[1].startswith("-"))


class ForkedChild:
    """A stage child forked by the template, seen as a Popen (pid, poll, wait, returncode)."""

    def __init__(self, conn: socket.socket, pid: int):
        self.conn, self.pid = conn, pid
        self.returncode: int | None = None
        self.buffer = b""

    def _read(self, timeout: float | None) -> None:
        self.conn.settimeout(timeout)
        try:
            data = self.conn.recv(4096)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data:  # the template died: its pdeathsig has sent the child SIGTERM
            self.returncode = self._lost()
            return
        self.buffer += data
        if b"\n" in self.buffer:
            self.returncode = int(json.loads(self.buffer.split(b"\n", 1)[0])["returncode"])
            self.conn.close()

    def _lost(self) -> int:
        self.conn.close()
        deadline = time.monotonic() + 60
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return -signal.SIGKILL

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("stage", timeout or 0.0)
            self._read(left)
        return self.returncode


class StageTemplate:
    """The template process, started by the orchestrator; `spawn` forks one stage from it."""

    def __init__(self, env: Mapping[str, str]):
        self.env = dict(env)
        self.folder = tempfile.mkdtemp(prefix="ftw-template-")
        self.path = os.path.join(self.folder, "socket")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.job.template_server", self.path],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            preexec_fn=die_with_parent(),
        )
        self.ready = False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """True once the template listens (what preprocessing imports is in); False if it died or took too long."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            self.ready = os.path.exists(self.path)
            if not self.ready:
                time.sleep(0.05)
        return True

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, argv: list[str], env: Mapping[str, str], stdout_fd: int, stderr_fd: int) -> ForkedChild:
        if not self.wait_ready():
            raise OSError(f"the stage template (pid {self.proc.pid}) is not running (exit {self.proc.poll()})")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        request = json.dumps({"argv": argv[1:], "env": dict(env), "cwd": os.getcwd()}).encode()
        conn.sendall(len(request).to_bytes(8, "big"))
        socket.send_fds(conn, [request], [stdout_fd, stderr_fd])
        conn.settimeout(READY_TIMEOUT_S)  # a stage past preprocessing waits for the template's later imports
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                chunk = conn.recv(1)
            except OSError:  # timed out: closed, so the template will not fork it after all
                conn.close()
                raise
            if not chunk:
                conn.close()
                raise OSError("the stage template closed the connection before forking")
            reply += chunk
        return ForkedChild(conn, int(json.loads(reply)["pid"]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in (self.path, self.folder):
            try:
                os.unlink(p) if p == self.path else os.rmdir(p)
            except OSError:
                pass


_shared: StageTemplate | None = None
_lock = threading.Lock()


def shared(env: Mapping[str, str]) -> StageTemplate | None:
    """This worker's template for stages whose environment (secrets and per-job keys aside) is
    `env`, started on first use and kept for the next jobs; None when turned off."""
    global _shared
    if not enabled(env):
        return None
    with _lock:
        if _shared is not None and _shared.env == dict(env) and not _shared.alive() and not _shared.ready:
            return None  # it failed before it could fork anything: this worker's stages start fresh
        if _shared is not None and (_shared.env != dict(env) or not _shared.alive()):
            _shared.close()  # another environment: imports may have read it, so a new template
            _shared = None
        if _shared is None:
            _shared = StageTemplate(env)
            atexit.register(_shared.close)
        return _shared

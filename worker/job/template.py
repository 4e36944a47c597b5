"""The stage template: one pre-imported process per worker that forks the stage children.

Every stage child used to start a fresh interpreter and import torch, transformers, datasets and
peft (~10 s on a small machine, several on a GPU host) — preprocess and train each, every job.
The template pays that once: `python -m worker.job.template SOCKET` imports them (and the stage
modules) without touching CUDA, then waits on a Unix socket. For each stage the supervisor sends
the command line, the full environment (with the job's secrets: over the socket, never on disk),
the working directory and the write ends of its stdout/stderr pipes (SCM_RIGHTS); the template
forks, and the child becomes the stage: its own session (process group), the pipes as fd 1/2,
the environment replaced, PR_SET_PDEATHSIG armed, its process name set to the module's (it keeps
the template's command line), then `python -m MODULE ARGS` run in place (runpy). CUDA is
initialised by the child only, after the fork (a forked CUDA context is unusable, which is why the
template never touches it). The template reaps the child and sends its exit
status back on the same connection, so to the supervisor a `ForkedChild` is a Popen: pid, poll,
wait, returncode — limits, SIGTERM/SIGKILL to the group, logs and exit codes are unchanged.

Parent death: the template dies with the worker (PR_SET_PDEATHSIG), and each child with the
template, by SIGTERM: a training child saves its step, as with a plain child.

The orchestrator imports only the client half below (`StageTemplate`, no torch); `serve()` runs
in the template process. FTW_STAGE_TEMPLATE=0 turns the template off (every stage a fresh
interpreter); a command the template cannot run in place (torchrun for several GPUs) is always
started fresh.
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from worker.lifeline import die_with_parent, pid_alive
from worker.train import LAZY_IMPORTS

READY_TIMEOUT_S = 300.0
PR_SET_NAME = 15
PRELOAD = (
    "torch",
    "transformers",
    "datasets",
    "peft",
    "worker.data.pipeline",
    "worker.train.child",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "peft.tuners.lora",
    "torch.distributed.checkpoint.state_dict",
    "matplotlib",
)
OPTIONAL = LAZY_IMPORTS  # imported when available: what the train child imports lazily on a GPU


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
            [sys.executable, "-m", "worker.job.template", self.path],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            preexec_fn=die_with_parent(),
        )
        self.ready = False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """True once the template listens (its imports done); False if it died or took too long."""
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
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(1)
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


# ---- the template process -----------------------------------------------------------------------
def serve(path: str) -> None:
    """Import, listen, fork a stage per request, report each child's exit status; single-threaded
    (fork from a process with other threads could copy a lock held mid-operation)."""
    import importlib

    name_process("ftw-template")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # an import asking torch.cuda.is_available() must not init CUDA
    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if sys.modules["torch"].cuda.is_initialized():  # children could not use CUDA: no template (fresh stages)
        raise SystemExit("ftw stage template: an import initialised CUDA; stages start as fresh processes")
    gc.freeze()  # what is imported stays shared with the children (no copy-on-write by collections)
    arm_pdeathsig = die_with_parent()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(16)
    os.replace(path + ".tmp", path)  # the orchestrator connects once the name exists: imports are done
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                conn, _ = server.accept()
                pid = _fork_stage(conn, server, wake_r, wake_w, arm_pdeathsig)
                if pid is not None:
                    children[pid] = conn
            else:
                os.read(wake_r, 4096)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            finished = children.pop(pid, None)
            if finished is not None:
                try:
                    finished.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                finished.close()


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    size = int.from_bytes(_recv_exactly(conn, 8), "big")
    data, fds, _, _ = socket.recv_fds(conn, size, 2)
    while len(data) < size:
        data += _recv_exactly(conn, size - len(data))
    request: dict[str, Any] = json.loads(data)
    return request, fds


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise OSError("connection closed")
        out += chunk
    return out


def _fork_stage(
    conn: socket.socket,
    server: socket.socket,
    wake_r: int,
    wake_w: int,
    arm_pdeathsig: Callable[[], None] | None,
) -> int | None:
    try:
        request, fds = _recv_request(conn)
    except (OSError, ValueError):
        conn.close()
        return None
    pid = os.fork()
    if pid == 0:  # the stage child: never returns
        code = 1
        try:
            for fd in (server.fileno(), wake_r, wake_w, conn.fileno()):
                os.close(fd)
            code = _become_stage(request, fds, arm_pdeathsig)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    return pid


def _become_stage(request: dict[str, Any], fds: list[int], arm_pdeathsig: Callable[[], None] | None) -> int:
    """In the forked child: the stage's session, fds, environment and signals, then its module."""
    import runpy

    os.setsid()
    if arm_pdeathsig is not None:
        arm_pdeathsig()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (devnull, *fds):
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=True)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = request["argv"]  # ["-m", module, *args] or [script, *args]
    name_process(argv[1] if argv[0] == "-m" else os.path.basename(argv[0]))
    print(
        f"ftw: stage forked from the template (pid {os.getppid()}); "
        "torch, transformers, datasets, peft were imported there",
        file=sys.stderr,
        flush=True,
    )
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT` has it
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else _message_exit(e.code))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what a normal interpreter exit would run (trackers, temp folders)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def name_process(name: str) -> None:
    """The process name `ps -o comm`, top and psutil's name() show (15 bytes at most): a forked
    stage keeps the template's command line, so its name says which stage it is."""
    from worker.lifeline import _prctl

    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_NAME, name.encode()[:15])


def _message_exit(message: object) -> int:
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    serve(sys.argv[1])

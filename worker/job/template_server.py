"""The stage template's own process (`python -m worker.job.template_server SOCKET`, started by
worker/job/template.py's `StageTemplate`): imports, then forks a stage per request and reports its exit status.

Its imports come in two parts. The preprocess stage needs torch, transformers (its tokenizer's auto classes),
datasets and the data pipeline (`FIRST`): once those are in, the template listens and forks `python -m worker.data`
at once. The train stage's own imports (`LATER`: peft, the modeling code, ftw's kernels, matplotlib) follow one at a
time while no request waits, so on a fresh worker they run beside preprocessing instead of before it; a request for
any other stage waits until they are all in. Every fork happens between two imports, from this one thread.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import io
import json
import os
import selectors
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

from worker.lifeline import die_with_parent
from worker.train import LAZY_IMPORTS

PR_SET_NAME = 15
FIRST = ("torch", "transformers", "datasets", "worker.data.pipeline", "transformers.models.auto.tokenization_auto")
FIRST_STAGES = ("worker.data",)  # `python -m` modules that FIRST serves
LATER = (
    "peft",
    "worker.train.child",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "peft.tuners.lora",
    "torch.distributed.checkpoint.state_dict",
    "matplotlib",
)
OPTIONAL = LAZY_IMPORTS  # imported when available: what the train child imports lazily on a GPU

Request = tuple[socket.socket, dict[str, Any], list[int]]


def cuda_initialised() -> bool:
    return bool(sys.modules["torch"].cuda.is_initialized())


class Imports:
    """What the template has imported so far, and whether its children can still use CUDA."""

    def __init__(self) -> None:
        # an import asking torch.cuda.is_available() must not initialise CUDA
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        for name in FIRST:
            importlib.import_module(name)
        if cuda_initialised():  # children could not use CUDA: no template (fresh stages)
            raise SystemExit("ftw stage template: an import initialised CUDA; stages start as fresh processes")
        self.left = [(name, True) for name in LATER] + [(name, False) for name in OPTIONAL]
        self.failed: str | None = None  # why the stages past preprocessing start fresh instead
        gc.freeze()  # what is imported stays shared with the children (no copy-on-write by collections)

    def serves(self, request: dict[str, Any]) -> bool:
        argv = request["argv"]
        return not self.left or (argv[0] == "-m" and argv[1] in FIRST_STAGES)

    def import_next(self) -> None:
        name, required = self.left.pop(0)
        try:
            importlib.import_module(name)
        except Exception as e:  # the stages that need it start fresh, and meet the error in their own log
            if required or not isinstance(e, ImportError):
                self.failed = f"importing {name} failed"
                traceback.print_exc()
        if not self.left:
            if cuda_initialised():
                self.failed = "an import initialised CUDA"
            gc.freeze()


def serve(path: str) -> None:
    """Import, listen, fork a stage per request, report each child's exit status; single-threaded
    (fork from a process with other threads could copy a lock held mid-operation)."""
    name_process("ftw-template")
    imports = Imports()
    arm_pdeathsig = die_with_parent()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(16)
    os.replace(path + ".tmp", path)  # the orchestrator connects once the name exists: FIRST is imported
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    waiting: list[Request] = []  # requests for stages that need LATER, until it is imported

    def fork(request: Request) -> None:
        conn, _, fds = request
        if _hung_up(conn) or imports.failed is not None:  # the orchestrator starts (or started) it fresh
            if imports.failed is not None:
                print(f"ftw stage template: {imports.failed}; a stage starts fresh", file=sys.stderr, flush=True)
            for fd in fds:  # the stage's stdout and stderr, which no child of ours will write
                os.close(fd)
            conn.close()
            return
        pid = _fork_stage(request, (server.fileno(), wake_r, wake_w), arm_pdeathsig, everything=not imports.left)
        children[pid] = conn

    while True:
        events = selector.select(0 if imports.left else None)
        for key, _ in events:
            if key.fileobj is server:
                request = _accept(server)
                if request is not None and imports.serves(request[1]):
                    fork(request)
                elif request is not None:
                    waiting.append(request)
            else:
                os.read(wake_r, 4096)
        if imports.left and not events:
            imports.import_next()
            if not imports.left:
                for request in waiting:
                    fork(request)
                waiting.clear()
        _reap(children)


def _accept(server: socket.socket) -> Request | None:
    conn, _ = server.accept()
    try:
        request, fds = _recv_request(conn)
    except (OSError, ValueError):
        conn.close()
        return None
    return conn, request, fds


def _hung_up(conn: socket.socket) -> bool:
    """Whether the orchestrator closed its end of a request's connection."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _reap(children: dict[int, socket.socket]) -> None:
    """Each finished child's exit status, to the connection that asked for it."""
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
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
    request: Request, listening: tuple[int, ...], arm_pdeathsig: Callable[[], None] | None, everything: bool
) -> int:
    """Fork the stage; the child closes the template's own descriptors (`listening`) and never returns.
    `everything`: the template's imports are all in (else the train stage's are still to come)."""
    conn, asked, fds = request
    pid = os.fork()
    if pid == 0:  # the stage child: never returns
        code = 1
        try:
            for fd in (*listening, conn.fileno()):
                os.close(fd)
            code = _become_stage(asked, fds, arm_pdeathsig, everything)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:  # the orchestrator went away meanwhile: nobody would supervise the stage
        os.kill(pid, signal.SIGKILL)
    return pid


def _become_stage(
    request: dict[str, Any], fds: list[int], arm_pdeathsig: Callable[[], None] | None, everything: bool
) -> int:
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
    imported = "torch, transformers, datasets, peft were" if everything else "what preprocessing imports was"
    print(
        f"ftw: stage forked from the template (pid {os.getppid()}); {imported} imported there",
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

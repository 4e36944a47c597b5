"""Start "local endpoint + real runpod workers" as subprocesses on loopback (demo, tests, bench).

    from worker.devtools.endpoint.local import LocalEndpoint

    with LocalEndpoint(db="volume/endpoint.sqlite3", api_key="k") as endpoint:
        worker = endpoint.start_worker("handler.py", env={"BASE_VOLUME": "volume"})
        env = endpoint.client_env()      # RUNPOD_ENDPOINT_BASE_URL / _ID / RUNPOD_API_KEY for `ftw submit`
        ...                              # submit with the runpod client or `ftw submit`
    # leaving the block stops the workers, then the endpoint (SIGTERM to each process group)

API
- `LocalEndpoint(db, api_key, endpoint_id="local", port=0, args=(), log_path=None, worker_key=None,
  env=None)`: `worker_key` (FTW_ENDPOINT_WORKER_KEY, random when None) is what workers' tokens derive
  from; `env` is added to the endpoint process's environment (e.g. FTW_ALLOWED_HOSTS); `.start()`
  (also `__enter__`) runs `python -m worker.devtools.endpoint.cli` and waits until it listens; `.url`
  (`http://127.0.0.1:PORT`), `.base_url` (`.url + "/v2"`), `.port`; `.stop()`; `.restart()` keeps
  the port and database (a restarted endpoint loses no job). `args` are extra `ftw endpoint` flags.
- `.client_env()` → the variables the runpod client / `ftw submit|status|stream|cancel` read.
- `.worker_env(worker_id)` → the variables that put an unmodified `python handler.py` in platform
  mode against this endpoint (RUNPOD_WEBHOOK_*, RUNPOD_AI_API_KEY = the worker's own token,
  RUNPOD_POD_ID; the SDK's system fitness checks are skipped: they need internet).
- `.start_worker(handler_path, env=None, worker_id=None, log_path=None)` → `LocalWorker` with
  `.pid`, `.alive()`, `.stop()`; `env` is added to this process's environment.
- Module functions `worker_env(url, endpoint_id, worker_key, worker_id)` and `spawn_worker(...)` do
  the same for an endpoint started some other way (`ftw endpoint --worker handler.py` uses them).
Logs of each process go to `log_path` (appended) or, when None, to this process's stderr. On
Linux every process started here gets SIGTERM when the process (thread) that started it dies, so
a killed demo or test run leaves no endpoint or worker behind.
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

from worker.lifeline import die_with_parent

REPO = Path(__file__).resolve().parents[3]
READY_PREFIX = "ftw endpoint listening on "


def _log_sink(log_path: Path | None) -> IO[Any] | None:
    if log_path is None:
        return None
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    return open(log_path, "ab")


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group, then SIGKILL what is left after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class LocalWorker:
    def __init__(self, proc: subprocess.Popen, worker_id: str, sink: IO[Any] | None):
        self.proc, self.worker_id, self._sink = proc, worker_id, sink

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        _stop_group(self.proc, grace_s)
        if self._sink:
            self._sink.close()


class LocalEndpoint:
    def __init__(
        self,
        db: str | os.PathLike[str],
        api_key: str,
        endpoint_id: str = "local",
        port: int = 0,
        args: tuple[str, ...] | list[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        worker_key: str | None = None,
        env: dict[str, str] | None = None,
    ):
        self.db, self.api_key, self.endpoint_id, self.port = Path(db), api_key, endpoint_id, port
        self.worker_key, self.env = worker_key or secrets.token_hex(32), dict(env or {})
        self.args, self.log_path = list(args), Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self.workers: list[LocalWorker] = []
        self._sink: IO[Any] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v2"

    def start(self, timeout_s: float = 30.0) -> LocalEndpoint:
        env = {
            **os.environ,
            **self.env,
            "FTW_ENDPOINT_API_KEY": self.api_key,
            "FTW_ENDPOINT_WORKER_KEY": self.worker_key,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self._sink = _log_sink(self.log_path)
        cmd = [
            sys.executable,
            "-m",
            "worker.devtools.endpoint.cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db",
            str(self.db),
            "--endpoint-id",
            self.endpoint_id,
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._sink,
            start_new_session=True,
            preexec_fn=die_with_parent(),
            cwd=REPO,
        )
        line = self._first_line(timeout_s)
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(
                f"ftw endpoint did not start (exit {self.proc.returncode}): {line.strip()!r}; "
                f"see {self.log_path or 'stderr'}"
            )
        self.port = int(line.strip().rsplit(":", 1)[1])
        return self

    def _first_line(self, timeout_s: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                return self.proc.stdout.readline().decode(errors="replace")
            if self.proc.poll() is not None:
                return ""
        return ""

    def stop(self) -> None:
        """SIGTERM to the workers, then the endpoint (closing its long-polls lets the workers exit at once)."""
        for worker in self.workers:
            if worker.alive():
                os.killpg(worker.pid, signal.SIGTERM)
        self.stop_endpoint_only()
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def stop_endpoint_only(self) -> None:
        """Stop the endpoint process and leave the workers running (restart tests, crash drills)."""
        if self.proc is not None:
            _stop_group(self.proc, grace_s=10.0)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        if self._sink:
            self._sink.close()
            self._sink = None

    def restart(self) -> LocalEndpoint:
        self.stop_endpoint_only()
        return self.start()

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self) -> dict[str, str]:
        return {
            "RUNPOD_ENDPOINT_BASE_URL": self.base_url,
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,
            "RUNPOD_API_KEY": self.api_key,
        }

    def worker_env(self, worker_id: str) -> dict[str, str]:
        return worker_env(self.url, self.endpoint_id, self.worker_key, worker_id)

    def start_worker(
        self,
        handler_path: str | os.PathLike[str],
        env: dict[str, str] | None = None,
        worker_id: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> LocalWorker:
        worker = spawn_worker(
            handler_path,
            self.url,
            self.endpoint_id,
            self.worker_key,
            env=env,
            worker_id=worker_id,
            log_path=log_path or self.log_path,
        )
        self.workers.append(worker)
        return worker


def worker_env(
    url: str, endpoint_id: str, worker_key: str, worker_id: str, ping_interval_ms: int = 5000
) -> dict[str, str]:
    """What puts an unmodified runpod handler in platform mode against the endpoint at `url`."""
    from worker.devtools.endpoint.server import worker_token, worker_urls

    return {
        **worker_urls(url, endpoint_id),
        "RUNPOD_AI_API_KEY": worker_token(worker_key, worker_id),
        "RUNPOD_POD_ID": worker_id,
        "RUNPOD_PING_INTERVAL": str(ping_interval_ms),
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",  # they include a connection to 8.8.8.8
        "PYTHONUNBUFFERED": "1",
    }


def spawn_worker(
    handler_path: str | os.PathLike[str],
    url: str,
    endpoint_id: str,
    worker_key: str,
    env: dict[str, str] | None = None,
    worker_id: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> LocalWorker:
    """`python HANDLER` in its own process group, in its folder, with the repository importable."""
    handler_path = Path(handler_path).resolve()
    worker_id = worker_id or f"local-{uuid.uuid4().hex[:8]}"
    full_env = {**os.environ, **(env or {}), **worker_env(url, endpoint_id, worker_key, worker_id)}
    full_env.pop("FTW_ENDPOINT_WORKER_KEY", None)  # the worker holds its own token, not the key behind every token
    full_env.pop("FTW_ENDPOINT_API_KEY", None)  # nor the clients' key
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    sink = _log_sink(Path(log_path) if log_path else None)
    proc = subprocess.Popen(
        [sys.executable, str(handler_path)],
        env=full_env,
        cwd=handler_path.parent,
        stdout=sink,
        stderr=subprocess.STDOUT if sink else None,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    return LocalWorker(proc, worker_id, sink)

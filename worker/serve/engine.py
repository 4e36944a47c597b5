"""The inference engine as a child process on loopback, and the client that talks to it.

Both engines speak the same OpenAI-compatible HTTP API, so everything above this module is one
code path: vLLM's own server (`python -m vllm.entrypoints.openai.api_server`, runtime LoRA
loading on) or ftw's transformers+peft server (`python -m worker.serve.hf_server`, the fallback
where vLLM is not installed). The worker process never imports vLLM or torch; the engine may run
in another Python (`FTW_SERVE_PYTHON`, e.g. a venv holding vLLM's pins).

Start: own session, logs to a file, wait for /health with a monotonic deadline, fail fast with
the log tail if the child dies. Stop: SIGTERM to the group, wait, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from worker.errors import InfraError, ServeError
from worker.lifeline import die_with_parent
from worker.serve.engine_defaults import cpu_kv_cache_gib, failure_reason, model_dtype, sizes_its_own_memory, vllm_build
from worker.serve.settings import ENGINE_KEEP_ALIVE_S, ServeSettings

REPO = Path(__file__).resolve().parents[2]


def resolve_engine(settings: ServeSettings) -> str:
    if settings.engine != "auto":
        return settings.engine
    return "vllm" if vllm_build(settings.python) else "transformers"


def vllm_args(settings: ServeSettings, port: int) -> list[str]:
    """`vllm serve` flags from the settings (pure: tested without starting anything)."""
    args = [
        "--model",
        settings.model,
        "--served-model-name",
        settings.served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        "--trust-request-chat-template",
    ]  # only ftw sets chat_template (an adapter's own); users cannot
    if settings.enable_lora:
        args += [
            "--enable-lora",
            "--max-loras",
            str(settings.max_loras),
            "--max-lora-rank",
            str(settings.max_lora_rank),
            "--max-cpu-loras",
            str(settings.max_cpu_loras),
        ]
    optional = {
        "--max-model-len": settings.max_model_len,
        "--max-num-seqs": settings.max_num_seqs,
        "--dtype": settings.dtype,
        "--gpu-memory-utilization": settings.gpu_memory_utilization,
        "--tensor-parallel-size": settings.tensor_parallel_size,
        "--seed": settings.seed,
    }
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    if settings.enforce_eager:
        args.append("--enforce-eager")
    return args + list(settings.vllm_extra_args)


def engine_command(settings: ServeSettings, engine: str, port: int) -> list[str]:
    """The child's command line; `settings.dtype` is already the model's when DTYPE was not set."""
    if engine == "vllm":
        return [settings.python, "-m", "vllm.entrypoints.openai.api_server", *vllm_args(settings, port)]
    args = [
        settings.python,
        "-m",
        "worker.serve.hf_server",
        "--model",
        settings.model,
        "--served-model-name",
        settings.served_name,
        "--port",
        str(port),
    ]
    if settings.max_model_len:
        args += ["--max-model-len", str(settings.max_model_len)]
    if settings.dtype:
        args += ["--dtype", settings.dtype]
    return [*args, "--keep-alive-s", str(settings.engine_keep_alive_s)]


# The engine closes a connection idle for settings.engine_keep_alive_s (ENGINE_KEEP_ALIVE_S); the
# client lets its pooled connections go well before that (CLIENT_KEEP_ALIVE_SHARE of it: 2 s of 5), so a
# request after an idle gap never picks one the engine is closing. A connection lost before any byte of
# the answer (a close racing the request, or one the client's busy loop had not noticed yet) means the
# engine did not take the request: it is sent again on a fresh connection.
CLIENT_KEEP_ALIVE_SHARE = 0.4
SEND_ATTEMPTS = 3
NOT_TAKEN = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)  # ClientOSError: reset, broken pipe, refused
PORT_TAKEN = "address already in use"  # what uvicorn (vLLM) and aiohttp log when the bind fails
PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    """One engine child: `start()` returns once it answers, `stop()` ends its process group."""

    def __init__(self, settings: ServeSettings, engine: str | None = None, log_path: Path | None = None):
        self.engine = engine or resolve_engine(settings)
        self.settings = replace(settings, dtype=settings.dtype or model_dtype(settings))
        self.cpu_kv_cache_gib = None  # set where vLLM's CPU build would otherwise reserve 92% of the node's memory
        if self.engine == "vllm" and not sizes_its_own_memory(settings) and vllm_build(settings.python) == "cpu":
            self.cpu_kv_cache_gib = cpu_kv_cache_gib()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="ftw-engine-")) / "engine.log"
        self.proc: subprocess.Popen | None = None
        self.stopping = False  # set by stop(): an exit after it is expected

    def describe(self) -> str:
        """The settings ftw chose for the engine, said plainly (and how to change them)."""
        dtype = self.settings.dtype
        said = (
            f"dtype {dtype} (DTYPE)"
            if self.settings.dtype == self.settings.env.get("DTYPE", "").strip()
            else f"dtype {dtype}, the model's (DTYPE changes it)"
            if dtype
            else "dtype chosen by the engine (DTYPE sets it)"
        )
        if self.cpu_kv_cache_gib:
            said += (
                f"; vLLM CPU KV cache {self.cpu_kv_cache_gib} GiB, a quarter of the memory available "
                "(VLLM_CPU_KVCACHE_SPACE changes it)"
            )
        return said

    def child_env(self) -> dict[str, str]:
        env = dict(self.settings.env or os.environ)
        if self.engine == "transformers":  # our server module; vLLM's child must not see our top-level names
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # adapters are loaded on demand
        env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(self.settings.engine_keep_alive_s)  # EngineClient's pool: 0.4× it
        if self.cpu_kv_cache_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kv_cache_gib)
        env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        return env

    def start(self, waiting: Callable[[float], None] = lambda waited_s: None) -> EngineProcess:
        """The port was free when picked, not necessarily when the engine binds it (minutes later for
        vLLM): an engine that exits because the port was taken starts again on a new one. `waiting` is
        called with the seconds waited so far at every poll until the engine answers (a caller's liveness
        signal: a start of minutes is not a hang)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        attempt = 1
        while True:
            cmd = engine_command(self.settings, self.engine, self.port)
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.child_env(),
                    start_new_session=True,
                    preexec_fn=die_with_parent(),
                )
            try:
                self._wait_healthy(self.settings.start_timeout_s, waiting, since=log_start)
                return self
            except InfraError:
                port_taken = self.proc.poll() is not None and PORT_TAKEN in self.log_tail(since=log_start).lower()
                if not port_taken or attempt == PORT_ATTEMPTS:
                    raise
            attempt += 1
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000, since: int = 0) -> str:
        """The last `chars` of the engine log written after byte `since` (this start's part)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def failure_reason(self, since: int = 0, chars: int = 10_000_000) -> str | None:
        """The engine's own reason for exiting, from the last `chars` of its log after byte `since`
        (see engine_defaults)."""
        return failure_reason(self.log_tail(chars=chars, since=since))

    def _wait_healthy(self, timeout_s: float, waiting: Callable[[float], None], since: int = 0) -> None:
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            waiting(time.monotonic() - started)
            if self.proc.poll() is not None:
                reason = self.failure_reason(since)
                raise InfraError(
                    f"the {self.engine} engine exited with code {self.proc.returncode} while starting"
                    + (f": {reason}" if reason else ""),
                    hint=(
                        "the engine's reason is above (memory: set VLLM_CPU_KVCACHE_SPACE in GiB on CPU, "
                        "GPU_MEMORY_UTILIZATION on a GPU)"
                        if reason
                        else "read the log tail: a wrong MODEL_NAME, too little memory or a bad engine setting"
                    ),
                    stage="serve",
                    log_tail=self.log_tail(since=since),
                    details={"engine_start": "exited", "engine_log": str(self.log_path)},
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise InfraError(
            f"the {self.engine} engine did not answer /health within {timeout_s:.0f}s",
            hint="raise FTW_SERVE_START_TIMEOUT_S or check the log tail",
            stage="serve",
            log_tail=self.log_tail(since=since),
            details={"engine_start": "timed_out", "engine_log": str(self.log_path), "timeout_s": timeout_s},
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        self.stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def _unreachable_as_error() -> Iterator[None]:
    try:
        yield
    except (TimeoutError, aiohttp.ClientError) as e:
        raise ServeError(
            f"the engine did not answer ({type(e).__name__}: {e})",
            status=503,
            hint="the engine process may have died; the worker's log has its last lines",
        ) from e


class EngineClient:
    """Async HTTP calls to the engine; its 4xx answers become ServeErrors with its message."""

    def __init__(self, url: str, timeout_s: float = 3600, engine_keep_alive_s: float = ENGINE_KEEP_ALIVE_S):
        self.url = url
        self.keep_alive_s = CLIENT_KEEP_ALIVE_SHARE * engine_keep_alive_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resent = 0  # requests sent again after their connection dropped before the answer

    def session(self) -> aiohttp.ClientSession:
        """One pooled session per event loop (RunPod's loop, a test's asyncio.run, ftw serve's)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=self.keep_alive_s)
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=connector)
            self._loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @contextlib.asynccontextmanager
    async def _response(self, route: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """The engine's response once its status line arrived; sent again when the connection dropped before."""
        with _unreachable_as_error():
            for attempt in range(1, SEND_ATTEMPTS + 1):
                try:
                    response = await self.session().post(self.url + route, json=body)
                    break
                except NOT_TAKEN:
                    if attempt == SEND_ATTEMPTS:
                        raise
                    self.resent += 1
            try:
                yield response
            finally:
                response.release()

    async def post(self, route: str, body: dict[str, Any]) -> Any:
        async with self._response(route, body) as r:
            return await self._json_or_raise(r)

    async def stream(self, route: str, body: dict[str, Any]) -> AsyncIterator[str]:
        """The engine's server-sent events, one `data: ...` payload string at a time."""
        async with self._response(route, body) as r:
            if r.status != 200:
                await self._json_or_raise(r)
            async for raw in r.content:
                line = raw.decode("utf-8").strip()
                if line.startswith("data:"):
                    yield line[5:].strip()

    @staticmethod
    async def _json_or_raise(r: aiohttp.ClientResponse) -> Any:
        text = await r.text()
        if r.status == 200:
            try:
                return json.loads(text) if text else None
            except ValueError:
                return text  # load/unload_lora_adapter answer plain text
        try:
            body = json.loads(text)
            err = body.get("error", body)
            message = err.get("message") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            message = text[:500]
        status = r.status if 400 <= r.status < 500 else 502
        raise ServeError(f"the engine refused the request: {message}", status=status)

"""Fixtures: a real `ftw endpoint` subprocess, real runpod workers, a loopback webhook listener."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.devtools.endpoint.local import LocalEndpoint

HERE = Path(__file__).resolve().parent
PROTOCOL_HANDLER = HERE / "protocol_handler.py"
API_KEY = "test-endpoint-key"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
FAST = ("--webhook-retry-delay-s", "0.3", "--take-wait-s", "5")


class Api:
    """Raw HTTP against the endpoint's client face (the runpod SDK is used where the tests say so)."""

    def __init__(self, endpoint: LocalEndpoint):
        self.endpoint = endpoint
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {endpoint.api_key}"

    def url(self, path: str) -> str:
        return f"{self.endpoint.base_url}/{self.endpoint.endpoint_id}/{path}"

    def run(self, job_input: dict[str, Any], **extra: Any) -> str:
        r = self.session.post(self.url("run"), json={"input": job_input, **extra}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "IN_QUEUE"
        return r.json()["id"]

    def status(self, job_id: str) -> dict[str, Any]:
        r = self.session.get(self.url(f"status/{job_id}"), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def stream(self, job_id: str) -> dict[str, Any]:
        r = self.session.get(self.url(f"stream/{job_id}"), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str) -> requests.Response:
        return self.session.post(self.url(path), timeout=10)

    def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool] = lambda s: s["status"] in TERMINAL,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if until(status):
                return status
            assert time.monotonic() < deadline, f"job {job_id} stuck at {status}"
            time.sleep(0.05)

    def collect_stream(self, job_id: str, until: Callable[[list[Any]], bool], timeout: float = 30.0) -> list[Any]:
        """Stream outputs read so far, polling until `until(items)` or the job ends."""
        items: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            chunk = self.stream(job_id)
            items += [c["output"] for c in chunk["stream"]]
            if until(items) or chunk["status"] in TERMINAL:
                return items
            assert time.monotonic() < deadline, f"stream of {job_id} stuck: {items}"
            time.sleep(0.05)


class WebhookListener:
    """A loopback HTTP server that records every POST; `fail_first[path] = n` answers 500 n times."""

    def __init__(self):
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.fail_first: dict[str, int] = {}
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                listener.received.append((self.path, body))
                failing = listener.fail_first.get(self.path, 0)
                listener.fail_first[self.path] = failing - 1
                self.send_response(500 if failing > 0 else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def calls(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.received if p == path]

    def wait_calls(self, path: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.calls(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(self.calls(path))} webhook calls, wanted {count}"
            time.sleep(0.05)
        return self.calls(path)


def start_endpoint(tmp: Path, *, handler_kind: str | None = "generator", args: tuple[str, ...] = FAST) -> LocalEndpoint:
    endpoint = LocalEndpoint(
        tmp / "endpoint.sqlite3",
        API_KEY,
        args=args,
        log_path=tmp / "endpoint.log",
        env={"FTW_ALLOWED_HOSTS": "127.0.0.1"},
    ).start()  # the webhook listener is on loopback
    if handler_kind:
        endpoint.start_worker(PROTOCOL_HANDLER, env={"HANDLER_KIND": handler_kind}, log_path=tmp / "worker.log")
    return endpoint


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Iterator[LocalEndpoint]:
    """One endpoint with one generator-handler worker, shared by a module's tests (jobs run one by one)."""
    endpoint = start_endpoint(tmp_path_factory.mktemp("endpoint"))
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="module")
def api(endpoint) -> Api:
    return Api(endpoint)


@pytest.fixture(scope="module")
def webhooks() -> Iterator[WebhookListener]:
    listener = WebhookListener()
    yield listener
    listener.server.shutdown()

"""Clients and workers hold different keys (as on RunPod), and a worker speaks only for itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.endpoint.conftest import API_KEY, PROTOCOL_HANDLER, Api, start_endpoint
from tests.endpoint.test_bad_requests import expect_error
from worker.devtools.endpoint.server import worker_token


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    endpoint = start_endpoint(tmp_path_factory.mktemp("keys"), handler_kind=None)
    yield endpoint
    endpoint.stop()


def as_worker(endpoint, worker_id: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = worker_token(endpoint.worker_key, worker_id)
    return session


def test_the_client_key_opens_no_worker_route_and_a_worker_token_no_client_route(bare):
    api = Api(bare)
    job_id = api.run({"secret-bearing": "input"})
    for method, path in [
        ("GET", "job-take/w1?gpu=x&job_in_progress=0"),
        ("GET", "job-take-batch/w1?gpu=x&batch_size=2"),
        ("GET", "job-stop/w1?gpu=x"),
        ("POST", f"job-done/w1/{job_id}?gpu=x&isStream=false"),
        ("POST", f"job-stream/w1/{job_id}?gpu=x"),
        ("GET", "ping/w1?job_id=x"),
    ]:
        expect_error(api.session.request(method, api.url(path), data=b'{"output": "forged"}'), 401, "worker route")
    worker = as_worker(bare, "w1")
    for method, path in [("POST", "run"), ("GET", f"status/{job_id}"), ("GET", "health"), ("POST", f"cancel/{job_id}")]:
        expect_error(worker.request(method, api.url(path), json={"input": {}}), 401, "invalid API key")
    expect_error(worker.get(api.url("job-take/w2?gpu=x&job_in_progress=0")), 401, "worker 'w2'")  # w1 cannot be w2
    assert api.status(job_id) == {"id": job_id, "status": "IN_QUEUE"}
    assert api.session.get(api.url("health")).json()["workers"] == {"idle": 0, "running": 0}
    api.post("purge-queue")


def test_only_the_worker_that_took_a_job_reports_on_it(bare):
    api = Api(bare)
    job_id = api.run({"n": 1})
    taker, other = as_worker(bare, "taker"), as_worker(bare, "other")
    taken = taker.get(api.url("job-take/taker?gpu=x&job_in_progress=0"), timeout=30)
    assert taken.status_code == 200 and taken.json()["id"] == job_id
    for path in (f"job-done/other/{job_id}?gpu=x&isStream=false", f"job-stream/other/{job_id}?gpu=x"):
        expect_error(other.post(api.url(path), data=json.dumps({"output": "forged"})), 409, "worker taker")
    assert api.status(job_id)["status"] == "IN_PROGRESS" and "output" not in api.status(job_id)
    assert taker.post(api.url(f"job-done/taker/{job_id}?gpu=x&isStream=false"), data=json.dumps({"output": "real"})).ok
    assert api.status(job_id)["output"] == "real"


def test_a_real_sdk_worker_with_the_client_key_takes_nothing(bare, tmp_path):
    api = Api(bare)
    job_id = api.run({"steps": 1})
    env = {**os.environ, **bare.worker_env("impostor"), "RUNPOD_AI_API_KEY": API_KEY, "PYTHONPATH": os.getcwd()}
    log = tmp_path / "impostor.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(PROTOCOL_HANDLER)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "401" not in log.read_text(errors="replace"):  # the SDK logs its refused job-take
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert api.status(job_id) == {"id": job_id, "status": "IN_QUEUE"}
        real = bare.start_worker(PROTOCOL_HANDLER, worker_id="real-worker")
        assert api.wait(job_id)["workerId"] == "real-worker"
        real.stop()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the SDK's heartbeat is a child process: the whole group goes
        proc.wait()


def test_health_counts_a_stuck_worker_as_running_after_its_job_timed_out(tmp_path):
    endpoint = start_endpoint(tmp_path, handler_kind="progress")
    try:
        api = Api(endpoint)
        job_id = api.run({"steps": 1, "mode": "block", "block_s": 40}, policy={"executionTimeout": 6000})
        assert api.wait(job_id, timeout=60)["status"] == "TIMED_OUT"
        # the handler still blocks its worker: the heartbeat says so, the worker is not idle
        assert api.session.get(api.url("health")).json()["workers"] == {"idle": 0, "running": 1}
    finally:
        # the worker is stuck on purpose (40 s in a sleep that outlasts SIGTERM): no grace period to wait out
        for worker in endpoint.workers:
            if worker.alive():
                os.killpg(worker.pid, signal.SIGKILL)
                worker.proc.wait()
        endpoint.stop()

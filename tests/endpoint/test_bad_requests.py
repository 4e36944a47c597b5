"""Bad requests get the right status and a JSON error, and the endpoint keeps serving."""

from __future__ import annotations

import json

import pytest
import requests
import runpod

from tests.endpoint.conftest import Api, start_endpoint
from worker.devtools.endpoint.server import worker_token

MB = 1024 * 1024


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """An endpoint with no worker: jobs stay queued."""
    endpoint = start_endpoint(tmp_path_factory.mktemp("bare"), handler_kind=None)
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="module")
def api(bare) -> Api:
    return Api(bare)


def padded_body(size: int) -> bytes:
    """A valid /run body of exactly `size` bytes."""
    head, tail = b'{"input": {"pad": "', b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def expect_error(response: requests.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert fragment in response.json()["error"]


def test_auth_is_required_on_both_faces(api):
    url = api.url("run")
    expect_error(requests.post(url, json={"input": {}}), 401, "missing Authorization header")
    expect_error(
        requests.post(url, json={"input": {}}, headers={"Authorization": "Bearer wrong"}), 401, "invalid API key"
    )
    expect_error(requests.get(api.url("job-take/w1?gpu=x&job_in_progress=0")), 401, "missing Authorization")
    expect_error(requests.get(api.url("health"), headers={"Authorization": "nope"}), 401, "invalid API key")


def test_the_runpod_client_reports_a_wrong_key(bare, monkeypatch):
    monkeypatch.setattr(runpod, "endpoint_url_base", bare.base_url)
    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        runpod.Endpoint(bare.endpoint_id, api_key="wrong").health()


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"input": {"a": 1}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"inputs": {}}', "no 'input'"),
        (b'{"input": {}, "policy": {"executionTimeout": 1000}}', "policy.executionTimeout"),
        (b'{"input": {}, "policy": {"ttl": "1h"}}', "policy.ttl"),
        (b'{"input": {}, "policy": []}', "policy must be an object"),
        (b'{"input": {}, "webhook": "ftp://x"}', "webhook must be an http(s) URL"),
        (b'{"input": {}, "webhook": "http://[::1"}', "no valid host"),
        (b'{"input": {}, "webhook": "http://h.example.com:99999/"}', "no valid host"),
        (b'{"input": {}, "webhook": "http://169.254.169.254/latest/meta-data"}', "link-local"),
        (b'{"input": {}, "webhook": "http://[::ffff:10.0.0.1]/hook"}', "private"),
        (b'{"input": {}, "webhook": "http://0x7f000001/hook"}', "non-standard form"),
        (b'{"input": {}, "webhook": "http://metadata.google.internal/"}', "inside a network"),
        (b'{"input": {}, "webhook": "http://127.0.0.2:9/"}', "loopback"),  # FTW_ALLOWED_HOSTS=127.0.0.1 only
        (b'{"input": {}, "s3Config": "s3://x"}', "s3Config must be an object"),
    ],
)
def test_malformed_requests_are_400(api, body, fragment):
    expect_error(api.session.post(api.url("run"), data=body), 400, fragment)


def test_payload_limits_are_10mb_for_run_and_20mb_for_runsync(api):
    ok = api.session.post(api.url("run"), data=padded_body(10 * MB))
    assert ok.status_code == 200 and ok.json()["status"] == "IN_QUEUE"
    expect_error(api.session.post(api.url("run"), data=padded_body(10 * MB + 1)), 413, "10 MB limit")
    expect_error(api.session.post(api.url("runsync"), data=padded_body(20 * MB + 1)), 413, "20 MB limit")
    body = padded_body(30 * MB)  # chunked, no Content-Length: refused while reading
    chunks = (body[i : i + MB] for i in range(0, len(body), MB))
    expect_error(api.session.post(api.url("runsync"), data=chunks), 413, "too large")


def test_unknown_job_ids_and_endpoints_are_404(api):
    for method, path in [
        ("GET", "status/nope"),
        ("GET", "stream/nope"),
        ("POST", "cancel/nope"),
        ("POST", "retry/nope"),
    ]:
        expect_error(api.session.request(method, api.url(path)), 404, "no job with id 'nope'")
    expect_error(api.session.get(api.url("status/nope").replace("/local/", "/other/")), 404, "no endpoint 'other'")
    expect_error(api.session.get(api.endpoint.url + "/v1/whatever"), 404, "Not Found")


def test_a_worker_cannot_report_on_a_job_it_does_not_run(api):
    job_id = api.run({"x": 1})
    response = requests.post(
        api.url(f"job-done/intruder/{job_id}?gpu=x&isStream=false"),
        data=json.dumps({"output": "forged"}),
        headers={"Authorization": worker_token(api.endpoint.worker_key, "intruder")},
    )
    expect_error(response, 409, "IN_QUEUE")
    assert api.status(job_id) == {"id": job_id, "status": "IN_QUEUE"}


def test_purge_queue_cancels_queued_jobs_only(api):
    api.post("purge-queue")
    ids = [api.run({"n": i}) for i in range(3)]
    assert api.post("purge-queue").json() == {"removed": 3, "status": "completed"}
    for job_id in ids:
        status = api.status(job_id)
        assert status["status"] == "CANCELLED" and "purge-queue" in status["error"]
    assert api.session.get(api.url("health")).json()["jobs"]["inQueue"] == 0


def test_the_endpoint_still_serves_after_all_of_the_above(api):
    job_id = api.run({"still": "here"})
    assert api.status(job_id)["status"] == "IN_QUEUE"
    health = api.session.get(api.url("health")).json()
    assert health["jobs"]["inQueue"] >= 1 and health["workers"]["running"] == 0


def test_runsync_answers_with_the_id_when_the_wait_runs_out(api):
    response = api.session.post(api.url("runsync?wait=1000"), json={"input": {"quick": False}})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("sync-") and body["status"] == "IN_QUEUE"
    expect_error(
        api.session.post(api.url("runsync?wait=10"), json={"input": {}}), 400, "wait must be in [1000, 300000]"
    )
    expect_error(api.session.post(api.url("runsync?wait=soon"), json={"input": {}}), 400, "wait must be an integer")


def test_an_upload_cut_off_midway_creates_nothing_and_is_no_internal_error(api):
    """A client that dies mid-body (network drop, Ctrl-C) is an ordinary event: one log line, no job."""
    import socket
    import time

    before = api.session.get(api.url("health")).json()["jobs"]
    with socket.create_connection(("127.0.0.1", api.endpoint.port)) as sock:
        sock.sendall(
            b"POST /v2/local/run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + api.endpoint.api_key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            + b'{"input": {"a": "'
            + b"x" * 1000
        )
    log = api.endpoint.log_path
    deadline = time.monotonic() + 30
    while "before its body arrived" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    assert "internal error" not in log.read_text() and "Traceback" not in log.read_text()
    assert api.session.get(api.url("health")).json()["jobs"] == before

"""The real runpod worker SDK (platform mode) against `ftw endpoint`: states, stream, webhooks, stop."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import runpod

from tests.conftest import pid_alive, wait_gone
from tests.endpoint.conftest import PROTOCOL_HANDLER, TERMINAL, Api, start_endpoint


@pytest.fixture
def sdk(endpoint, monkeypatch) -> runpod.Endpoint:
    """The runpod client, pointed at the local endpoint the way RUNPOD_ENDPOINT_BASE_URL does."""
    monkeypatch.setattr(runpod, "endpoint_url_base", endpoint.base_url)
    return runpod.Endpoint(endpoint.endpoint_id, api_key=endpoint.api_key)


def hook_path() -> str:
    return f"/hook/{uuid.uuid4().hex}"


def test_job_goes_queue_progress_completed_with_stream_and_one_webhook(api, sdk, webhooks):
    blocker = sdk.run({"input": {"steps": 6, "step_s": 0.15}})  # keeps the single worker busy
    path = hook_path()
    job = sdk.run(
        {"input": {"steps": 4, "step_s": 0.3, "echo": "hello"}, "webhook": webhooks.url(path)}
    )  # 1.2 s to be seen IN_PROGRESS

    seen = [api.status(job.job_id)["status"]]
    items = []
    while seen[-1] not in ("COMPLETED", "FAILED"):
        chunk = api.stream(job.job_id)
        items += [c["output"] for c in chunk["stream"]]
        status = api.status(job.job_id)["status"]
        if status != seen[-1]:
            seen.append(status)
        time.sleep(0.02)
    items += [c["output"] for c in api.stream(job.job_id)["stream"]]

    assert seen == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert [i["step"] for i in items if "step" in i] == [1, 2, 3, 4]  # each item handed out once, in order
    assert items[-1] == {"result": {"echo": "hello", "s3": False}}
    assert job.output(timeout=10)[-1] == {"result": {"echo": "hello", "s3": False}}
    status = api.status(job.job_id)
    assert status["delayTime"] > 0 and status["executionTime"] > 0 and status["workerId"]
    assert sdk.health()["jobs"]["completed"] >= 1
    assert blocker.status() == "COMPLETED"

    calls = webhooks.wait_calls(path, 1)
    time.sleep(1.0)  # longer than the retry delay: a second call would have come by now
    assert webhooks.calls(path) == [status] == calls


def test_failed_job_is_failed_and_its_webhook_is_sent(api, webhooks):
    path = hook_path()
    job_id = api.run({"steps": 1, "mode": "fail"}, webhook=webhooks.url(path))
    status = api.wait(job_id)
    assert status["status"] == "FAILED"
    assert "failed on purpose" in status["error"]
    assert webhooks.wait_calls(path, 1) == [status]


def test_webhook_is_retried_twice_then_given_up(api, webhooks):
    flaky, dead = hook_path(), hook_path()
    webhooks.fail_first[flaky] = 2
    webhooks.fail_first[dead] = 99
    ok_id = api.run({"steps": 1}, webhook=webhooks.url(flaky))
    dead_id = api.run({"steps": 1}, webhook=webhooks.url(dead))
    assert api.wait(ok_id)["status"] == api.wait(dead_id)["status"] == "COMPLETED"

    assert webhooks.wait_calls(flaky, 3) == [api.status(ok_id)] * 3
    assert len(webhooks.wait_calls(dead, 3)) == 3
    time.sleep(1.0)
    assert len(webhooks.calls(dead)) == 3  # RunPod's rule: the first POST and 2 retries, no more


def test_cancel_reaches_the_worker_and_stops_the_handlers_child(api, webhooks):
    path = hook_path()
    job_id = api.run({"steps": 1, "mode": "child"}, webhook=webhooks.url(path))
    items = api.collect_stream(job_id, lambda items: any("child_pid" in i for i in items))
    child_pid = next(i["child_pid"] for i in items if "child_pid" in i)
    assert pid_alive(child_pid)

    response = api.post(f"cancel/{job_id}")
    assert response.status_code == 200 and response.json() == {"id": job_id, "status": "CANCELLED"}
    assert wait_gone(child_pid), "the stop signal did not reach the handler: its child still runs"
    assert webhooks.wait_calls(path, 1)[0]["status"] == "CANCELLED"
    time.sleep(0.5)
    assert api.status(job_id)["status"] == "CANCELLED"  # nothing the worker sent afterwards changed it
    assert api.wait(api.run({"steps": 1}))["status"] == "COMPLETED"  # the worker serves on


def test_a_cancel_right_after_the_worker_took_the_job_still_stops_it(api):
    """The SDK ignores a stop that arrives before it has created the job's task; the endpoint repeats it."""
    job_id = api.run({"steps": 1, "step_s": 0.5, "mode": "child"})
    api.wait(job_id, until=lambda s: s["status"] == "IN_PROGRESS", timeout=30)
    assert api.post(f"cancel/{job_id}").json()["status"] == "CANCELLED"
    # the handler would otherwise wait 600 s on its child and hold the only worker
    assert api.wait(api.run({"steps": 1}), timeout=20)["status"] == "COMPLETED"


def test_execution_timeout_times_the_job_out_and_stops_it(api, webhooks):
    path = hook_path()
    started = time.monotonic()
    job_id = api.run({"steps": 1, "mode": "child"}, webhook=webhooks.url(path), policy={"executionTimeout": 5001})
    items = api.collect_stream(job_id, lambda items: any("child_pid" in i for i in items))
    child_pid = next(i["child_pid"] for i in items if "child_pid" in i)
    status = api.wait(job_id, timeout=20)
    assert status["status"] == "TIMED_OUT"
    assert "executionTimeout of 5001 ms" in status["error"]
    assert 5.0 <= time.monotonic() - started < 15
    assert wait_gone(child_pid)
    assert webhooks.wait_calls(path, 1)[0]["status"] == "TIMED_OUT"


def test_retry_runs_a_failed_job_again_under_the_same_id(api):
    job_id = api.run({"steps": 1, "mode": "fail"})
    assert api.wait(job_id)["status"] == "FAILED"
    response = api.post(f"retry/{job_id}")
    assert response.status_code == 200 and response.json() == {"id": job_id, "status": "IN_QUEUE"}
    again = api.wait(job_id, until=lambda s: s["status"] == "FAILED" and s.get("retries") == 1)
    assert "failed on purpose" in again["error"]

    done = api.run({"steps": 1})
    api.wait(done)
    refused = api.post(f"retry/{done}")
    assert refused.status_code == 409 and "only FAILED or TIMED_OUT" in refused.json()["error"]


def test_runsync_returns_the_output(sdk):
    assert sdk.run_sync({"input": {"steps": 2, "step_s": 0.05, "echo": "sync"}}, timeout=30)[-1] == {
        "result": {"echo": "sync", "s3": False}
    }


def test_s3config_reaches_the_handler_and_no_secret_reaches_the_log(api, endpoint):
    secret = f"s3-secret-{uuid.uuid4().hex}"
    job_id = api.run(
        {"steps": 1},
        s3Config={"accessId": "a", "accessSecret": secret, "bucketName": "c", "endpointUrl": "http://127.0.0.1:1"},
    )
    assert api.wait(job_id)["output"][-1]["result"]["s3"] is True
    assert secret not in json.dumps(api.status(job_id))
    log = endpoint.log_path.read_text()
    assert job_id in log and secret not in log and endpoint.api_key not in log


def test_progress_update_shows_on_status_while_in_progress_and_is_not_streamed(tmp_path):
    """As on RunPod: progress_update sets /status's output while IN_PROGRESS; /stream carries none of it."""
    endpoint = start_endpoint(tmp_path, handler_kind="progress")
    try:
        api = Api(endpoint)
        job_id = api.run({"steps": 3, "step_s": 0.5, "echo": "p"})
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while (status := api.status(job_id))["status"] not in TERMINAL:
            if status["status"] == "IN_PROGRESS" and "output" in status:
                seen.append(status["output"]["step"])
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status["status"] == "COMPLETED" and status["output"] == {"result": {"echo": "p"}}
        assert seen and seen == sorted(seen) and set(seen) <= {1, 2, 3}
        assert api.stream(job_id)["stream"] == []
        failed = api.wait(api.run({"steps": 1, "mode": "fail"}))
        assert failed["status"] == "FAILED" and failed["error"] == "the test handler failed on purpose"
    finally:
        endpoint.stop()


def test_a_worker_with_concurrency_takes_a_batch_and_runs_it_at_once(tmp_path):
    endpoint = start_endpoint(tmp_path, handler_kind=None)
    try:
        api = Api(endpoint)
        ids = [api.run({"steps": 6, "step_s": 0.5, "echo": n}) for n in range(2)]  # queued before the worker is up
        endpoint.start_worker(PROTOCOL_HANDLER, env={"HANDLER_CONCURRENCY": "2"}, log_path=tmp_path / "worker.log")
        api.wait(ids[0], until=lambda s: s["status"] != "IN_QUEUE")
        assert [api.status(i)["status"] for i in ids] == ["IN_PROGRESS", "IN_PROGRESS"]
        assert [api.wait(i)["output"][-1]["result"]["echo"] for i in ids] == [0, 1]
        assert f"job {ids[1]} IN_PROGRESS on worker local-" in (tmp_path / "endpoint.log").read_text()
        assert "(batch of 2)" in (tmp_path / "endpoint.log").read_text()
    finally:
        endpoint.stop()

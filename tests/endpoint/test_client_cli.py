"""`ftw submit|status|stream|cancel` as a user runs them, against the local endpoint and a real worker."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import runpod

from tests.conftest import REPO, child_env
from tests.endpoint.conftest import WebhookListener
from worker.devtools.endpoint.client_cli import ClientError, build_request, duration_ms, main

H = 3_600_000


def ftw(endpoint, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`ftw ARGS` in a subprocess, as a user runs it."""
    env = child_env(**(endpoint.client_env() if env is None else env))
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def ftw_here(endpoint, monkeypatch, capsys):
    """The same commands in this process (no 3-5 s `import runpod` per call): (exit code, stdout, stderr)."""
    monkeypatch.setattr(runpod, "endpoint_url_base", runpod.endpoint_url_base)

    def call(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        for key, value in (endpoint.client_env() if env is None else env).items():
            monkeypatch.setenv(key, value)
        if env == {}:
            for key in endpoint.client_env():
                monkeypatch.delenv(key, raising=False)
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def write_job(tmp_path, job_input) -> str:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_input))
    return str(path)


def test_submit_wait_streams_progress_and_ends_with_the_status(endpoint, tmp_path):
    webhooks = WebhookListener()
    try:
        job = write_job(tmp_path, {"steps": 3, "step_s": 0.2, "echo": "cli"})
        done = ftw(endpoint, "submit", job, "--wait", "--no-validate", "--webhook", webhooks.url("/cli"))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        assert [line.split()[:3] for line in lines[:3]] == [["train", "step", f"{i}/3"] for i in (1, 2, 3)]
        final = json.loads(lines[-1])
        assert final["status"] == "COMPLETED" and final["output"][-1] == {"result": {"echo": "cli", "s3": False}}
        assert f"submitted job {final['id']}" in done.stderr
        assert webhooks.wait_calls("/cli", 1) == [final]
    finally:
        webhooks.server.shutdown()


def test_submit_then_stream_and_status(ftw_here, tmp_path):
    code, out, err = ftw_here("submit", write_job(tmp_path, {"steps": 2, "echo": "later"}), "--no-validate")
    assert code == 0, err
    job = json.loads(out)
    assert job["status"] == "IN_QUEUE"
    code, out, _ = ftw_here("stream", job["id"])
    assert code == 0 and "step 2/2" in out
    code, out, _ = ftw_here("status", job["id"])
    assert code == 0 and json.loads(out)["status"] == "COMPLETED"


def test_cancel_and_a_stream_that_ends_cancelled(ftw_here, tmp_path):
    job = json.loads(ftw_here("submit", write_job(tmp_path, {"steps": 1, "mode": "child"}), "--no-validate")[1])
    code, out, _ = ftw_here("cancel", job["id"])
    assert code == 0 and json.loads(out) == {"id": job["id"], "status": "CANCELLED"}
    code, _, err = ftw_here("stream", job["id"])  # the SDK's own Job.stream() never ends on CANCELLED
    assert code == 1 and "ended CANCELLED: cancelled by the client" in err


def test_failed_job_exits_1_with_the_error(ftw_here, tmp_path):
    code, out, err = ftw_here("submit", write_job(tmp_path, {"steps": 1, "mode": "fail"}), "--wait", "--no-validate")
    assert code == 1
    assert json.loads(out.strip().splitlines()[-1])["status"] == "FAILED"
    assert "failed on purpose" in err


def test_an_invalid_job_is_refused_before_it_is_sent(ftw_here, tmp_path):
    code, _, err = ftw_here("status", "nope")
    assert code == 4 and "no job with id 'nope'" in err
    code, out, err = ftw_here("submit", write_job(tmp_path, {"run_id": "../x", "config": {"base_model": "m"}}))
    assert code == 3
    assert "run_id" in err and "was not sent" in err and out == ""
    unreadable = tmp_path / "broken.json"
    unreadable.write_text("{broken")
    code, out, err = ftw_here("submit", str(unreadable))
    assert code == 2 and err.count(str(unreadable)) == 1 and "not valid JSON" in err and out == ""


def test_environment_and_connection_errors_are_explained(endpoint, ftw_here, tmp_path):
    code, _, err = ftw_here("submit", write_job(tmp_path, {"steps": 1}), "--no-validate", env={})
    assert code == 2 and "set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY" in err
    code, _, err = ftw_here("status", "x", env={**endpoint.client_env(), "RUNPOD_API_KEY": "wrong"})
    assert code == 4 and "refused the API key" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    started = time.monotonic()
    code, _, err = ftw_here(
        "status", "x", env={**endpoint.client_env(), "RUNPOD_ENDPOINT_BASE_URL": f"http://127.0.0.1:{closed_port}/v2"}
    )
    assert code == 4 and "cannot reach" in err
    assert time.monotonic() - started < 10


def test_policies_default_to_training_lengths_and_flags_override():
    assert build_request({"run_id": "r"}, None, None, None) == {
        "input": {"run_id": "r"},
        "policy": {"executionTimeout": 24 * H, "ttl": 48 * H},
    }
    request = build_request(
        {"input": {"a": 1}, "policy": {"executionTimeout": 2 * H}, "s3Config": {"b": 1}}, "http://h", None, None
    )
    assert request["policy"] == {"executionTimeout": 2 * H, "ttl": 26 * H} and request["webhook"] == "http://h"
    assert request["s3Config"] == {"b": 1}
    assert build_request({}, None, duration_ms("90m"), duration_ms("2d"))["policy"] == {
        "executionTimeout": 90 * 60_000,
        "ttl": 48 * H,
    }
    assert build_request({}, None, duration_ms("6d"), None)["policy"]["ttl"] == 7 * 24 * H  # RunPod's cap
    with pytest.raises(ClientError, match="at least the executionTimeout"):
        build_request({}, None, duration_ms("10h"), duration_ms("1h"))
    with pytest.raises(ClientError, match="maximum of 7 days"):
        build_request({}, None, duration_ms("8d"), None)


def test_ctrl_c_while_following_leaves_the_job_running_and_says_so(endpoint, api, tmp_path):
    job_id = api.run({"steps": 1, "mode": "child"})
    follower = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "stream", job_id],
        env=child_env(**endpoint.client_env()),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "child_pid" in follower.stdout.readline() + follower.stdout.readline()  # it is following
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=15) == 130
        assert f"job {job_id} keeps running" in follower.stderr.read()
        assert api.status(job_id)["status"] == "IN_PROGRESS"
    finally:
        follower.kill()
        api.post(f"cancel/{job_id}")


def test_submit_estimate_prints_the_estimate_before_sending(ftw_here, tmp_path):
    config = {
        "base_model": "meta-llama/Llama-3.2-1B",
        "datasets": [{"path": "org/data", "type": "alpaca"}],
        "adapter": "lora",
        "sequence_len": 2048,
        "sample_packing": True,
        "micro_batch_size": 8,
        "max_steps": 100,
        "learning_rate": 1e-4,
    }
    # the protocol worker of these tests runs {"steps": ...}; the config rides along for the estimate
    code, out, err = ftw_here(
        "submit", write_job(tmp_path, {"steps": 1, "config": config}), "--no-validate", "--estimate"
    )
    assert code == 0, err
    table, sent = err.index("NVIDIA H200"), err.index("submitted job")
    assert table < sent and "cheapest that fits:" in err and "model: table:llama-3.2-1b" in err
    assert json.loads(out.strip().splitlines()[-1])["status"] == "IN_QUEUE"
    code, out, err = ftw_here(
        "submit",
        write_job(tmp_path, {"steps": 1, "config": {**config, "base_model": "x/unknown"}}),
        "--no-validate",
        "--estimate",
    )
    assert code == 0 and "no estimate (x/unknown: shape unknown" in err and "submitting anyway" in err

"""A job with a huge value cannot take the worker out of service.

A 9 MB `datasets[0].type` kept a worker busy until its job TIMED_OUT, and `ftw run` ignored
SIGTERM meanwhile: the orchestrator's redaction of the job (config.json, the failure result) was
quadratic, and a signal handler only runs between Python bytecodes, never inside one long regex.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time

from tests.conftest import REPO, child_env
from tests.job.conftest import example_job, write_job

BIG = 9_000_000
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_ftw_run_with_a_9mb_value_still_obeys_sigterm(demo_volume, tmp_path):
    job = example_job(
        run_id="big-template",
        config={"chat_template": "jinja", "chat_template_jinja": "{# " + "x" * BIG + " #}" + TEMPLATE},
    )
    path = write_job(tmp_path / "job.json", job)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", str(path)],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(BASE_VOLUME=str(demo_volume), FTW_ALLOW_CPU="1", FTW_PROGRESS_INTERVAL_S="0"),
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while "preparing the run folder" not in lines.get(timeout=max(deadline - time.monotonic(), 0.1)):
            pass
        proc.send_signal(signal.SIGTERM)  # while the orchestrator writes config.json (its redaction was quadratic)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 1 and result["status"] == "preempted", result
    assert len(out) < 100_000  # the result does not echo the template


def test_a_9mb_invalid_value_fails_the_job_with_a_short_result(volume):
    """The invalid job's result carries each problem once, as a short excerpt."""
    from worker.job.pipeline import run_job

    result = run_job({"input": example_job(config={"datasets": [{"path": "org/data", "type": "x" * BIG}]})})
    assert result["status"] == "failed" and result["error"]["code"] == "invalid_job", result["error"]["code"]
    assert len(json.dumps(result)) < 10_000 and "(9,000,000 characters)" in result["error"]["message"]


def test_an_invalid_job_with_thousands_of_problems_gets_a_readable_failure(volume):
    from worker.job.pipeline import run_job

    result = run_job({"input": example_job(config={"datasets": [{"path": "org/data", "type": "nope"}] * 5000})})
    error = result["error"]
    assert error["code"] == "invalid_job" and len(error["details"]["errors"]) == 100
    assert (
        error["message"].count("is not a known prompt strategy") == 10
        and "and 90 more (details.errors)" in error["message"]
    )


def test_an_unusable_s3config_fails_the_job_as_invalid_and_is_never_quoted(volume):
    """RunPod's s3Config arrives beside the input; a non-object one crashed the orchestrator, a value
    with a NUL byte would have failed as an environment variable of the first stage, and a bucket name
    or endpoint that outputs.s3 refuses would have failed only at publish, after training."""
    from worker.job.pipeline import run_job

    for s3_config, loc, says in (
        ("not-an-object", "s3Config", "must be an object"),
        ({"accessSecret": "s3cret\x00VALUE99"}, "s3Config.accessSecret", "NUL byte"),
        ({"accessId": 12345678}, "s3Config.accessId", "must be a string"),
        ({"bucketName": "My_Bucket", "accessSecret": "VALUE99-secret"}, "s3Config.bucketName", "not a bucket name"),
        ({"bucketName": "ok-bucket", "endpointUrl": "minio.local:9000"}, "s3Config.endpointUrl", "not an http"),
    ):
        result = run_job({"input": example_job()}, s3_config=s3_config)
        assert result["status"] == "failed" and result["error"]["code"] == "invalid_job", result
        assert result["error"]["details"]["errors"][-1]["loc"] == loc and says in result["error"]["message"]
        assert f"{loc}: " in result["error"]["message"] and "VALUE99" not in json.dumps(result)
        assert not (volume / "runs").exists() and not (volume / "store").exists()  # nothing was started


def test_a_huge_value_holding_a_url_secret_fails_clearly_before_any_stage(demo_volume):
    """Masked config values reach the children in one environment variable, which Linux caps at 128 KB."""
    from worker.job.pipeline import run_job

    template = "{# https://u:p@host/x " + "y" * 200_000 + " #}" + TEMPLATE
    result = run_job(
        {"input": example_job(run_id="env-cap", config={"chat_template": "jinja", "chat_template_jinja": template})}
    )
    assert result["status"] == "failed" and result["error"]["code"] == "invalid_job", result["error"]
    assert "URL password or signature" in result["error"]["message"] and "yyyy" not in json.dumps(result)

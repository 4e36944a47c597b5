"""handler.py through the real runpod SDK, a real tiny model trained for real, on CPU.

- `python handler.py --rp_serve_api` (the SDK's own local API server, which runs generator
  handlers on /runsync): job → validated → preprocess → train → adapter in the local store →
  result with artifacts and metrics; the handler process never imports torch/transformers
  (`-X importtime`); no secret from the environment or the job's credentials anywhere.
- `python handler.py --test_input ...` (the SDK's local test mode): an invalid job fails fast.
The platform protocol (job-take, stream, cancel) is covered by tests/endpoint with this handler.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, child_env
from tests.job.conftest import example_job
from tests.s3server import free_port

pytestmark = pytest.mark.slow
FAST = {"max_steps": 4, "save_steps": 2, "sequence_len": 64, "micro_batch_size": 2, "logging_steps": 1}
SECRETS = {
    "HF_TOKEN": "hf_envTokenAAAA1111bbbb",
    "WANDB_API_KEY": "wandbEnvKey0000ffff9999",
    "AWS_SECRET_ACCESS_KEY": "awsEnvSecretZZZZ8888",
}
JOB_SECRETS = {
    "hf_token": "hf_jobTokenCCCC2222dddd",
    "aws_secret_access_key": "awsJobSecretYYYY7777",
    "wandb_api_key": "wandbJobKeyXXXX6666",
}
HEAVY_IMPORT = re.compile(r"\|\s+(torch|transformers|datasets|peft|accelerate)(\.|\s*$)", re.M)


def every_file_contains(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_invalid_job_fails_in_the_sdk_local_test_mode(volume):
    bad = {"input": example_job(credentials=JOB_SECRETS, config={"learning_rate": -1, "datasets": []})}
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "handler.py", "--test_input", json.dumps(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=child_env(BASE_VOLUME=str(volume)),
        timeout=120,
    )
    assert out.returncode == 1
    assert "invalid_job" in out.stdout + out.stderr and "config.learning_rate" in out.stdout + out.stderr
    assert not HEAVY_IMPORT.search(out.stderr), "an invalid job loaded ML libraries before it was rejected"
    assert not (volume / "runs").exists()
    for secret in JOB_SECRETS.values():  # the SDK prints the whole local job at its default DEBUG level
        assert secret not in out.stdout + out.stderr


def test_end_to_end_through_the_runpod_sdk_leaves_no_secret(demo_volume, tmp_path):
    port = free_port()
    env = child_env(BASE_VOLUME=str(demo_volume), FTW_ALLOW_CPU="1", FTW_PROGRESS_INTERVAL_S="0", **SECRETS)
    log = (tmp_path / "handler.log").open("wb")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            "handler.py",
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/docs", timeout=2)
                break
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "handler.log").read_text()[
                    -3000:
                ]
                time.sleep(0.3)
        job = example_job(run_id="e2e", credentials=JOB_SECRETS, config=FAST)
        response = requests.post(f"http://127.0.0.1:{port}/runsync", json={"input": job}, timeout=600)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED", body
    *progress, result = body["output"]
    assert result["status"] == "completed", result
    stages = [p["stage"] for p in progress]
    assert stages.index("checks") < stages.index("preprocess") < stages.index("train") < stages.index("publish")
    steps = [p for p in progress if p["stage"] == "train" and "loss" in p]
    assert steps and steps[-1]["step"] == FAST["max_steps"] and all(isinstance(p["loss"], float) for p in steps)

    adapter = next(a for a in result["artifacts"] if a["kind"] == "adapter")
    assert adapter["target"] == "local" and adapter["uri"].startswith("file://")
    folder = Path(adapter["uri"].removeprefix("file://"))
    assert folder.is_relative_to(demo_volume / "store") and (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "manifest.json").is_file()
    assert result["metrics"]["steps"] == FAST["max_steps"] and result["metrics"]["tokens"] > 0
    assert {"validate_s", "preprocess_s", "train_s", "publish_s", "total_s"} <= set(result["timings"])
    assert json.loads((demo_volume / "runs" / "e2e" / "result.json").read_text())["status"] == "completed"

    handler_log = (tmp_path / "handler.log").read_bytes()
    assert not HEAVY_IMPORT.findall(handler_log.decode(errors="replace")), (
        "the handler process imported a heavy library"
    )
    assert b"import time:" in handler_log  # the check above did see the import trace
    for secret in [*SECRETS.values(), *JOB_SECRETS.values()]:
        needle = secret.encode()
        assert needle not in response.content, secret
        assert needle not in handler_log, secret
        assert every_file_contains(demo_volume, needle) == [], secret


def test_a_failed_status_post_does_not_fail_the_job(monkeypatch, capsys):
    import runpod.serverless

    import handler

    def refused(job, update):
        raise ConnectionError("the platform is unreachable")

    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "http://127.0.0.1:9/post")
    monkeypatch.setattr(runpod.serverless, "progress_update", refused)
    handler.status_poster({"id": "j1"})({"stage": "train", "step": 1})
    assert "progress_update failed (ConnectionError" in capsys.readouterr().err


class _RunpodImported(Exception):
    pass


def test_the_stage_template_starts_before_the_sdk_is_imported(monkeypatch):
    """A fresh worker's first step waits on the template's imports: they start before the SDK's (~2 s), not after."""
    import handler
    from worker.job import template

    order: list[str] = []

    class SeesRunpod:
        def find_spec(self, name, path=None, target=None):
            if name == "runpod":
                order.append("runpod")
                raise _RunpodImported
            return None

    monkeypatch.setattr(template, "shared", lambda env: order.append("template"))
    monkeypatch.delitem(sys.modules, "runpod")
    monkeypatch.setattr(sys, "meta_path", [SeesRunpod(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["handler.py"])
    monkeypatch.setenv("RUNPOD_WEBHOOK_GET_JOB", "http://127.0.0.1:9/job-take")
    with pytest.raises(_RunpodImported):
        handler.main()
    assert order == ["template", "runpod"]

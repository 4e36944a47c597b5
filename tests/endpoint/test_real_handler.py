"""The project's own handler.py, unmodified, as a RunPod worker of the local endpoint.

One job is submitted with `ftw submit --wait` and trains a tiny model for real (COMPLETED, adapter
published, webhook sent); a second shows its training steps on /status while it runs
(progress_update), is cancelled while its training child runs, and that child must be gone after.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO, child_env, wait_gone
from tests.endpoint.conftest import API_KEY, Api, WebhookListener
from worker.devtools.endpoint.local import LocalEndpoint

pytestmark = pytest.mark.slow
HANDLER = REPO / "handler.py"


def job_input(run_id: str, model_dir, data_path, max_steps: int) -> dict:
    return {
        "run_id": run_id,
        "config": {
            "base_model": str(model_dir),
            "datasets": [{"path": str(data_path), "type": "chat_template", "field_messages": "messages"}],
            "adapter": "lora",
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_target_linear": True,
            "sequence_len": 128,
            "sample_packing": True,
            "micro_batch_size": 2,
            "max_steps": max_steps,
            "learning_rate": 0.003,
            "logging_steps": 1,
            "save_steps": 1000,
            "seed": 0,
        },
        "publish": ["adapter"],
    }


def stage_children(worker_pid: int, module: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(worker_pid).children(recursive=True):
        try:
            if (
                module in " ".join(proc.cmdline()) or proc.name() == module[:15]
            ):  # forked from the stage template: named
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def test_real_handler_trains_then_a_cancel_stops_its_training_child(tmp_path, tiny_model_dir):
    volume = tmp_path / "volume"
    (volume / "data").mkdir(parents=True)
    data = shutil.copy(REPO / "examples" / "data" / "greetings.jsonl", volume / "data" / "greetings.jsonl")
    job_env = {
        "BASE_VOLUME": str(volume),
        "FTW_ALLOW_CPU": "1",
        "FTW_ALLOWED_PATHS": str(tiny_model_dir),
        "OMP_NUM_THREADS": "2",
    }
    webhooks = WebhookListener()
    endpoint = LocalEndpoint(
        tmp_path / "endpoint.sqlite3",
        API_KEY,
        args=("--take-wait-s", "5"),
        log_path=tmp_path / "endpoint.log",
        env={"FTW_ALLOWED_HOSTS": "127.0.0.1"},
    ).start()
    try:
        worker = endpoint.start_worker(HANDLER, env=job_env, log_path=tmp_path / "worker.log")
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(job_input("e2e-done", tiny_model_dir, data, max_steps=2)))
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "submit", str(job_file), "--wait", "--webhook", webhooks.url("/e2e")],
            env=child_env(**endpoint.client_env(), **job_env),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        lines = done.stdout.strip().splitlines()
        assert any(line.startswith("train") and "step 2/2" in line for line in lines), lines
        final = json.loads(lines[-1])
        result = final["output"][-1]
        assert final["status"] == "COMPLETED" and result["status"] == "completed"
        adapter = next(a for a in result["artifacts"] if a["kind"] == "adapter")
        assert (volume / "store" / "e2e-done" / "adapter" / "adapter_config.json").exists(), adapter
        assert webhooks.wait_calls("/e2e", 1) == [final]

        api = Api(endpoint)
        job_id = api.run(job_input("e2e-cancel", tiny_model_dir, data, max_steps=100_000))
        deadline = time.monotonic() + 300
        while not (children := stage_children(worker.pid, "worker.train")):
            assert api.status(job_id)["status"] in ("IN_QUEUE", "IN_PROGRESS"), api.status(job_id)
            assert time.monotonic() < deadline, "the training child never started"
            time.sleep(0.2)

        # progress_update: while training runs, /status carries the newest step (RunPod's way); until the
        # child's first step it still shows preprocessing's last phase, which has a step of its own
        def training_step(status: dict) -> bool:
            output = status.get("output")
            return isinstance(output, dict) and output.get("stage") == "train" and "step" in output

        while not training_step(status := api.status(job_id)):
            assert status["status"] == "IN_PROGRESS" and time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["output"]["total_steps"] == 100_000
        assert api.post(f"cancel/{job_id}").json()["status"] == "CANCELLED"
        for child in children:
            assert wait_gone(child.pid, timeout=90), f"training child {child.pid} outlived the cancel"
        assert worker.alive() and api.status(job_id)["status"] == "CANCELLED"
    finally:
        endpoint.stop()
        webhooks.server.shutdown()

"""No secret stays in the endpoint's files once its job ended: credentials and s3Config are deleted.

The real `ftw endpoint` and a real runpod worker run a job submitted with `ftw submit --wait`;
afterwards the raw bytes of every file in the endpoint's folder (the db, -wal, -shm, logs) are
searched for the job's fake secrets. The store's own test ends a job in every terminal state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from tests.conftest import REPO, child_env
from tests.endpoint.conftest import Api, start_endpoint
from worker.devtools.endpoint.store import JobStore


def fake_secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {
        name: f"{name}-FAKE-{tag}"
        for name in (
            "hf_token",
            "wandb_api_key",
            "aws_access_key_id",
            "aws_secret_access_key",
            "accessId",
            "accessSecret",
        )
    }


def request_with(secrets: dict[str, str], job_input: dict) -> dict:
    credentials = {k: v for k, v in secrets.items() if not k.startswith("access")}
    return {
        "input": {**job_input, "credentials": credentials},
        "s3Config": {
            "accessId": secrets["accessId"],
            "accessSecret": secrets["accessSecret"],
            "bucketName": "bucket",
            "endpointUrl": "http://127.0.0.1:1",
        },
    }


def files_holding(folder, secrets: dict[str, str]) -> list[str]:
    """'file: secret name' for every file under `folder` whose raw bytes contain a secret."""
    return [
        f"{path.name}: {name}"
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        for name, value in secrets.items()
        if value.encode() in path.read_bytes()
    ]


def test_a_finished_job_leaves_no_secret_in_any_endpoint_file(tmp_path):
    secrets = fake_secrets()
    endpoint = start_endpoint(tmp_path)
    try:
        job = tmp_path / "job.json"
        job.write_text(json.dumps(request_with(secrets, {"steps": 2, "step_s": 0.05, "echo": "secret-job"})))
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "submit", str(job), "--wait", "--no-validate"],
            env=child_env(**endpoint.client_env()),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        final = json.loads(done.stdout.strip().splitlines()[-1])
        assert final["status"] == "COMPLETED"
        assert final["output"][-1] == {"result": {"echo": "secret-job", "s3": True}}  # the worker did get s3Config
        job.unlink()  # the user's own file, not the endpoint's

        assert {p.name for p in tmp_path.iterdir()} >= {
            "endpoint.sqlite3",
            "endpoint.sqlite3-wal",
            "endpoint.sqlite3-shm",
        }
        assert files_holding(tmp_path, secrets) == []  # while the endpoint runs

        api = Api(endpoint)
        failed = api.run(
            {"steps": 1, "mode": "fail"}, **{k: v for k, v in request_with(secrets, {}).items() if k != "input"}
        )
        assert api.wait(failed)["status"] == "FAILED"
        refused = api.post(f"retry/{failed}")
        assert refused.status_code == 409
        assert (
            "s3Config" in refused.json()["error"] and "submit it again with its credentials" in refused.json()["error"]
        )
        assert api.status(failed)["status"] == "FAILED"
    finally:
        endpoint.stop()
    assert files_holding(tmp_path, secrets) == []  # and after it stopped


def test_every_terminal_state_deletes_the_secrets_and_keeps_their_names(tmp_path):
    secrets = fake_secrets()
    store = JobStore(tmp_path / "jobs.sqlite3")
    jobs = {
        name: store.create(request_with(secrets, {"run_id": name}), None, 6000, 20_000)
        for name in ("completed", "failed", "cancelled", "timed_out", "queued")
    }
    store.take("w1", 2)  # completed and failed run; the others wait in the queue
    store.close()  # an endpoint restart (as SQLite's auto-checkpoint in a long job): the secrets move into the db file
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.finish(store.get(jobs["completed"].id), {"ok": True}, None)
    store.finish(store.get(jobs["failed"].id), None, "it broke")
    store.cancel(jobs["cancelled"].id)
    store.db.execute("UPDATE jobs SET ttl_ms = 1 WHERE id = ?", (jobs["timed_out"].id,))
    assert store.expire(jobs["timed_out"].created_at + 1, worker_lost_s=60) == [jobs["timed_out"].id]

    queued = store.get(jobs["queued"].id)
    assert queued.status == "IN_QUEUE" and queued.work_item()["s3Config"]["accessSecret"] == secrets["accessSecret"]
    for name in ("completed", "failed", "cancelled", "timed_out"):
        job = store.get(jobs[name].id)
        assert job.status == name.upper()
        assert job.payload["input"] == {"run_id": name} and "s3Config" not in job.payload
        assert job.removed_secrets == {
            "input.credentials": ["aws_access_key_id", "aws_secret_access_key", "hf_token", "wandb_api_key"],
            "s3Config": ["accessId", "accessSecret", "bucketName", "endpointUrl"],
        }
    store.cancel(jobs["queued"].id)
    assert files_holding(tmp_path, secrets) == []


def test_an_older_file_loses_the_secrets_of_ended_jobs_when_opened(tmp_path):
    secrets = fake_secrets()
    store = JobStore(tmp_path / "jobs.sqlite3")
    ended = store.create({"input": {"x": 1}}, None, 6000, 20_000)
    waiting = store.create(request_with(secrets, {"x": 2}), None, 6000, 20_000)
    store.cancel(ended.id)
    # as an older ftw endpoint left it: the ended job still holds its secrets
    store.db.execute(
        "UPDATE jobs SET payload = ? WHERE id = ?", (json.dumps(request_with(secrets, {"x": 1})), ended.id)
    )
    store.close()

    again = JobStore(tmp_path / "jobs.sqlite3")
    assert "credentials" not in again.get(ended.id).payload["input"] and again.get(ended.id).removed_secrets
    assert again.get(waiting.id).payload == request_with(secrets, {"x": 2})  # the worker still needs these


def test_secrets_outside_the_credential_fields_are_masked_once_the_job_ended(tmp_path):
    """A presigned dataset URL, a password in a URL and a config key named like a credential are in
    no credential field; the worker needs them while the job waits, the store keeps them masked after."""
    tag = uuid.uuid4().hex[:12]
    secrets = {
        "signature": f"sig{tag}",
        "credential": f"AKIA{tag}",
        "password": f"pw{tag}",
        "config token": f"hf_{tag}",
    }
    job_input = {
        "run_id": "r",
        "config": {
            "hf_token": secrets["config token"],
            "datasets": [
                {
                    "path": f"https://b.s3.amazonaws.com/d.jsonl?X-Amz-Credential={secrets['credential']}"
                    f"&X-Amz-Signature={secrets['signature']}",
                    "type": "alpaca",
                },
                {"path": f"https://user:{secrets['password']}@example.com/d.jsonl", "type": "alpaca"},
            ],
        },
    }
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create({"input": job_input}, None, 6000, 20_000)
    assert store.take("w1", 1)[0].work_item()["input"] == job_input  # the worker gets them as sent
    store.finish(store.get(job.id), {"ok": True}, None)
    kept = store.get(job.id).payload["input"]["config"]
    assert kept["hf_token"] == "***" and kept["datasets"][1]["path"] == "https://***@example.com/d.jsonl"
    assert "X-Amz-Signature=***" in kept["datasets"][0]["path"]
    store.close()
    assert files_holding(tmp_path, secrets) == []

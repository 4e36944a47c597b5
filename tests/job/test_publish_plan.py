"""A job's publish targets and credentials are resolved once (a PublishPlan) and that one plan is what
the checkpoint restore, the checkpoint uploader and the final publish reach S3 with: a real job, real
children, the real S3 server, credentials sent only in RunPod's s3Config."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.job.conftest import example_job
from worker.job.pipeline import run_job
from worker.publish import checkpoints, run
from worker.publish.s3 import S3Settings
from worker.publish.targets import PublishPlan
from worker.publish.transfer import TransferSettings

pytestmark = pytest.mark.slow
S3_ENV = (
    "BUCKET_NAME",
    "BUCKET_ACCESS_KEY_ID",
    "BUCKET_SECRET_ACCESS_KEY",
    "BUCKET_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def test_one_plan_per_job_takes_s3config_credentials_to_the_bucket(demo_volume, s3_server, monkeypatch):
    for name in S3_ENV:  # the endpoint has no bucket and no S3 credentials: only the job's s3Config does
        monkeypatch.delenv(name, raising=False)
    bucket = s3_server.make_bucket("ftw-job-s3config")
    plans: list[PublishPlan] = []
    resolve = PublishPlan.resolve.__func__  # type: ignore[attr-defined]

    def counted(cls: type[PublishPlan], *args: Any, **kwargs: Any) -> PublishPlan:
        plans.append(resolve(cls, *args, **kwargs))
        return plans[-1]

    clients: list[S3Settings] = []  # the settings every S3 client of the job was made from

    def recording(make_client: Any) -> Any:
        def make(settings: S3Settings, transfer: TransferSettings) -> Any:
            clients.append(settings)
            return make_client(settings, transfer)

        return make

    monkeypatch.setattr(PublishPlan, "resolve", classmethod(counted))
    monkeypatch.setattr(checkpoints, "make_client", recording(checkpoints.make_client))
    monkeypatch.setattr(run, "make_client", recording(run.make_client))
    s3_config = {
        "bucketName": bucket,
        "accessId": s3_server.key,
        "accessSecret": s3_server.secret,
        "endpointUrl": s3_server.endpoint_url,
    }
    config = {"max_steps": 3, "save_steps": 2, "sequence_len": 64, "micro_batch_size": 2, "logging_steps": 1}
    job = example_job(run_id="s3config", config=config, publish=["adapter", "checkpoints"])

    result = run_job({"input": job}, s3_config=s3_config)

    assert result["status"] == "completed", result
    uris = {a["kind"]: a["uri"] for a in result["artifacts"]}
    assert uris["adapter"] == f"s3://{bucket}/s3config/adapter"
    assert uris["checkpoints"] == f"s3://{bucket}/s3config/checkpoints/checkpoint-2"
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="s3config/")
    assert {"s3config/adapter/manifest.json", "s3config/checkpoints/checkpoint-2/manifest.json"} <= {
        o["Key"] for o in listed["Contents"]
    }
    assert len(plans) == 1, "the publish plan was resolved more than once"
    (plan,) = plans
    assert plan.s3 is not None and plan.s3.settings.secret_key == s3_server.secret
    # restore, uploader and final publish: each client from the one plan's settings, none from the env
    assert len(clients) >= 3 and all(settings is plan.s3.settings for settings in clients)
    assert s3_server.secret not in os.environ.values() and s3_server.secret not in json.dumps(result)

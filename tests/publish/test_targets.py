"""Where a job's artifacts go and with which credentials: resolved from the job and the endpoint env."""

from __future__ import annotations

from tests.publish.conftest import make_job
from worker.publish.targets import Targets

ENV = {
    "BASE_VOLUME": "/vol",
    "BUCKET_ACCESS_KEY_ID": "bucket-key",
    "BUCKET_SECRET_ACCESS_KEY": "bucket-secret",
    "BUCKET_ENDPOINT_URL": "http://r2.example",
    "AWS_ACCESS_KEY_ID": "aws-key",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "AWS_REGION": "eu-west-1",
    "HF_TOKEN": "hf_env_token",
}


def test_job_outputs_and_credential_precedence():
    job = make_job(
        "t1",
        outputs={
            "s3": {"bucket": "my-bucket", "prefix": "/a/b/", "endpoint_url": "https://minio.local"},
            "hub": {"repo_id": "me/x"},
        },
        credentials={"aws_access_key_id": "job-key", "aws_secret_access_key": "job-secret", "hf_token": "hf_job"},
    )
    t = Targets.for_job(job, ENV)
    assert t.s3.uri == "s3://my-bucket/a/b/t1" and t.local is None
    assert (t.s3_settings.access_key, t.s3_settings.secret_key) == ("job-key", "job-secret")
    assert (t.s3_settings.endpoint_url, t.s3_settings.region) == ("https://minio.local", "eu-west-1")
    assert t.hub.token == "hf_job" and t.hub.private is True
    for secret in ("job-secret", "hf_job", "bucket-secret", "aws-secret"):
        assert secret not in repr(t)


def test_runpod_bucket_names_then_aws():
    t = Targets.for_job(make_job("t2", outputs={"s3": {"bucket": "b-1"}}), ENV)
    assert (t.s3_settings.access_key, t.s3_settings.endpoint_url) == ("bucket-key", "http://r2.example")
    aws_only = {k: v for k, v in ENV.items() if not k.startswith("BUCKET_")}
    t = Targets.for_job(make_job("t2", outputs={"s3": {"bucket": "b-1"}}), aws_only)
    assert (t.s3_settings.access_key, t.s3_settings.endpoint_url) == ("aws-key", None)


def test_bucket_from_the_endpoint_else_the_local_store():
    t = Targets.for_job(make_job("t3"), {**ENV, "BUCKET_NAME": "runpod-bucket", "FTW_S3_PREFIX": "ft/"})
    assert t.s3.uri == "s3://runpod-bucket/ft/t3" and t.local is None and t.hub is None
    t = Targets.for_job(make_job("t3"), ENV)
    assert t.s3 is None and str(t.local) == "/vol/store/t3"

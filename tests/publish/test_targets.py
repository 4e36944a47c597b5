"""Where a job's artifacts go and with which credentials: one PublishPlan from the job, RunPod's
s3Config and the endpoint env."""

from __future__ import annotations

from tests.publish.conftest import make_job, plan_for

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
S3_CONFIG = {
    "bucketName": "runpod-job-bucket",
    "accessId": "s3config-key",
    "accessSecret": "s3config-secret",
    "endpointUrl": "https://s3config.example",
}


def test_job_outputs_and_credential_precedence() -> None:
    job = make_job(
        "t1",
        outputs={
            "s3": {"bucket": "my-bucket", "prefix": "/a/b/", "endpoint_url": "https://minio.local"},
            "hub": {"repo_id": "me/x"},
        },
        credentials={"aws_access_key_id": "job-key", "aws_secret_access_key": "job-secret", "hf_token": "hf_job"},
    )
    plan = plan_for(job, ENV, S3_CONFIG)
    assert plan.s3 is not None and plan.hub is not None
    assert plan.s3.root.uri == "s3://my-bucket/a/b/t1" and plan.local is None
    settings = plan.s3.settings
    assert (settings.access_key, settings.secret_key) == ("job-key", "job-secret")
    assert (settings.endpoint_url, settings.region) == ("https://minio.local", "eu-west-1")
    assert plan.hub.token == "hf_job" and plan.hub.private is True
    for secret in ("job-secret", "hf_job", "bucket-secret", "aws-secret", "s3config-secret"):
        assert secret not in repr(plan)
    assert "TrainingConfig" not in repr(plan)  # a dataset URL in the config may carry a signature


def test_s3config_comes_before_the_endpoint_env_and_after_the_job() -> None:
    """RunPod's per-job s3Config names the bucket, the endpoint and the key pair when the job does not."""
    plan = plan_for(make_job("t4"), ENV, S3_CONFIG)
    assert plan.s3 is not None and plan.s3.root.uri == "s3://runpod-job-bucket/t4" and plan.local is None
    settings = plan.s3.settings
    assert (settings.access_key, settings.secret_key) == ("s3config-key", "s3config-secret")
    assert settings.endpoint_url == "https://s3config.example"
    only_bucket = plan_for(make_job("t4", outputs={"s3": {"bucket": "b-1"}}), ENV, {"bucketName": "ignored"})
    assert only_bucket.s3 is not None and only_bucket.s3.root.uri == "s3://b-1/t4"
    assert (only_bucket.s3.settings.access_key, only_bucket.s3.settings.endpoint_url) == (
        "bucket-key",
        "http://r2.example",
    )


def test_runpod_bucket_names_then_aws() -> None:
    plan = plan_for(make_job("t2", outputs={"s3": {"bucket": "b-1"}}), ENV)
    assert plan.s3 is not None
    assert (plan.s3.settings.access_key, plan.s3.settings.endpoint_url) == ("bucket-key", "http://r2.example")
    aws_only = {k: v for k, v in ENV.items() if not k.startswith("BUCKET_")}
    plan = plan_for(make_job("t2", outputs={"s3": {"bucket": "b-1"}}), aws_only)
    assert plan.s3 is not None
    assert (plan.s3.settings.access_key, plan.s3.settings.endpoint_url) == ("aws-key", None)


def test_bucket_from_the_endpoint_else_the_local_store() -> None:
    plan = plan_for(make_job("t3"), {**ENV, "BUCKET_NAME": "runpod-bucket", "FTW_S3_PREFIX": "ft/"})
    assert plan.s3 is not None and plan.s3.root.uri == "s3://runpod-bucket/ft/t3"
    assert plan.local is None and plan.hub is None
    plan = plan_for(make_job("t3"), ENV)
    assert plan.s3 is None and str(plan.local) == "/vol/store/t3"


def test_what_is_published_comes_from_the_job() -> None:
    job = make_job("t5", publish=["adapter", "checkpoints"], save_total_limit=3)
    plan = plan_for(job, ENV)
    assert plan.kinds == {"adapter", "checkpoints"} and plan.keep_checkpoints == 3 and plan.main_kind == "adapter"
    insurance = plan_for(make_job("t5", save_total_limit=3), ENV)
    assert insurance.keep_checkpoints == 1  # not asked for: only the newest, to resume from

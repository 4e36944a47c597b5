"""Connections cut mid-upload and mid-download (a loopback TCP proxy in front of the real S3 server):
retries succeed; when they run out the publish fails clearly and no manifest exists."""

from __future__ import annotations

import os

import pytest

from tests.publish.conftest import make_job, make_run_dir, plan_for
from worker.errors import PublishError
from worker.publish import publish_run, pull
from worker.publish.manifest import Manifest

MiB = 1024 * 1024


@pytest.fixture
def big_run(tiny_adapter, tmp_path):
    run = make_run_dir(tmp_path, tiny_adapter)
    (run / "adapter" / "weights.bin").write_bytes(os.urandom(12 * MiB))  # 3 parts of 5 MiB
    return run


def manifest_keys(s3_server, bucket: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith("manifest.json")]


def test_upload_survives_cut_connections(big_run, env, bucket, proxy, s3_server):
    proxy.cut(upload_after=1 * MiB, times=3)
    artifacts = publish_run(
        big_run,
        plan_for(make_job("cut-up", outputs={"s3": {"bucket": bucket}}), {**env, "BUCKET_ENDPOINT_URL": proxy.url}),
    )
    assert proxy.cuts_done == 3
    adapter = next(a for a in artifacts if a["kind"] == "adapter")
    proxy.heal()
    pulled = pull(adapter["uri"], env)
    assert Manifest.of_folder(pulled.path).files == Manifest.of_folder(big_run / "adapter").files


def test_upload_that_keeps_failing_leaves_no_manifest(big_run, env, bucket, proxy, s3_server):
    proxy.cut(upload_after=1 * MiB, times=None)
    job = make_job("cut-up-forever", outputs={"s3": {"bucket": bucket}})
    with pytest.raises(PublishError) as err:
        publish_run(big_run, plan_for(job, {**env, "BUCKET_ENDPOINT_URL": proxy.url, "FTW_PUBLISH_ATTEMPTS": "2"}))
    assert "failed after retries" in err.value.message and "resubmitting the same run_id" in err.value.hint
    assert err.value.retryable and err.value.details["published"] == []
    assert manifest_keys(s3_server, bucket) == []
    proxy.heal()
    with pytest.raises(PublishError, match="no manifest.json"):
        pull(f"s3://{bucket}/cut-up-forever/adapter", env)


def test_republish_over_a_failed_attempt_replaces_the_old_manifest_last(big_run, env, bucket, proxy, s3_server):
    job = make_job("again", outputs={"s3": {"bucket": bucket}})
    publish_run(big_run, plan_for(job, env))
    (big_run / "adapter" / "weights.bin").write_bytes(os.urandom(12 * MiB))
    proxy.cut(upload_after=1 * MiB, times=None)
    with pytest.raises(PublishError):
        publish_run(big_run, plan_for(job, {**env, "BUCKET_ENDPOINT_URL": proxy.url, "FTW_PUBLISH_ATTEMPTS": "2"}))
    # the old manifest went first: nobody can take the half-replaced prefix for the old artifact
    assert "again/adapter/manifest.json" not in manifest_keys(s3_server, bucket)


def test_download_survives_cut_connections(big_run, env, bucket, proxy):
    (adapter,) = [
        a
        for a in publish_run(big_run, plan_for(make_job("cut-down", outputs={"s3": {"bucket": bucket}}), env))
        if a["kind"] == "adapter"
    ]
    proxy.cut(download_after=2 * MiB, times=2)
    pulled = pull(adapter["uri"], {**env, "BUCKET_ENDPOINT_URL": proxy.url})
    assert proxy.cuts_done == 2
    assert Manifest.of_folder(pulled.path).sha256 == Manifest.of_folder(big_run / "adapter").sha256


def test_download_that_keeps_failing_caches_nothing(big_run, env, bucket, proxy, volume):
    (adapter,) = [
        a
        for a in publish_run(big_run, plan_for(make_job("cut-down-forever", outputs={"s3": {"bucket": bucket}}), env))
        if a["kind"] == "adapter"
    ]
    proxy.cut(download_after=2 * MiB, times=None)
    with pytest.raises(PublishError, match="failed after retries"):
        pull(adapter["uri"], {**env, "BUCKET_ENDPOINT_URL": proxy.url, "FTW_PUBLISH_ATTEMPTS": "2"})
    cache = volume / "cache" / "adapters"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".lock-")] == []


def test_checkpoint_upload_failure_fails_the_publish_and_leaves_no_manifest(
    tiny_adapter, tmp_path, env, bucket, proxy, s3_server
):
    from worker.publish import start_uploader

    run = make_run_dir(tmp_path, tiny_adapter, checkpoints=(3,))
    job = make_job("cut-ckpt", outputs={"s3": {"bucket": bucket}}, publish=["checkpoints"])
    proxy.cut(upload_after=200, times=None)  # the uploader's path to the bucket is broken; the final publish's is not
    uploader = start_uploader(
        run, plan_for(job, {**env, "BUCKET_ENDPOINT_URL": proxy.url, "FTW_PUBLISH_ATTEMPTS": "2"}), interval_s=0.1
    )
    with pytest.raises(PublishError, match=r"checkpoint upload failed for step\(s\) \[3\]") as err:
        publish_run(run, plan_for(job, env), uploader=uploader)
    assert "still in the run folder" in err.value.hint
    assert [a["kind"] for a in err.value.details["published"]] == ["logs"]  # what did get published is reported
    assert manifest_keys(s3_server, bucket) == ["cut-ckpt/logs/manifest.json"]

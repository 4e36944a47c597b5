"""Publishing to and pulling from a real S3 server (rclone serve s3 on loopback)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tests.publish.conftest import make_job, make_run_dir, plan_for
from worker.errors import PublishError
from worker.publish import publish_run, pull
from worker.publish.manifest import Manifest


def objects(s3_server, bucket: str) -> dict[str, int]:
    client = s3_server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def test_publish_adapter_and_logs_then_pull_by_uri_and_run_id(tiny_adapter, tmp_path, env, bucket, s3_server):
    run = make_run_dir(tmp_path, tiny_adapter)
    job = make_job("run-s3", outputs={"s3": {"bucket": bucket, "prefix": "team/ft"}})
    artifacts = publish_run(run, plan_for(job, env))

    by_kind = {a["kind"]: a for a in artifacts}
    assert set(by_kind) == {"adapter", "logs"} and all(a["target"] == "s3" for a in artifacts)
    assert by_kind["adapter"]["uri"] == f"s3://{bucket}/team/ft/run-s3/adapter"
    stored = objects(s3_server, bucket)
    manifest = Manifest.from_bytes(
        s3_server.client().get_object(Bucket=bucket, Key="team/ft/run-s3/adapter/manifest.json")["Body"].read()
    )
    assert manifest.sha256 == by_kind["adapter"]["sha256_manifest"]
    assert set(manifest.files) == {
        p.relative_to(run / "adapter").as_posix() for p in (run / "adapter").rglob("*") if p.is_file()
    }
    assert all(stored[f"team/ft/run-s3/adapter/{rel}"] == e["size"] for rel, e in manifest.files.items())
    assert "team/ft/run-s3/logs/summary.json" in stored and "team/ft/run-s3/logs/logs/train.log" in stored

    pulled = pull(by_kind["adapter"]["uri"], env)
    assert not pulled.cached and pulled.manifest_sha256 == manifest.sha256
    assert pulled.path.parent == env_volume(env) / "cache" / "adapters"
    assert Manifest.of_folder(pulled.path).files == manifest.files
    again = pull("run-s3", {**env, "BUCKET_NAME": bucket, "FTW_S3_PREFIX": "team/ft"})
    assert again.cached and again.path == pulled.path


def env_volume(env):
    from pathlib import Path

    return Path(env["BASE_VOLUME"]).resolve()


def test_pull_refuses_a_tampered_object_and_caches_nothing(tiny_adapter, tmp_path, env, bucket, s3_server):
    run = make_run_dir(tmp_path, tiny_adapter)
    job = make_job("run-tamper", outputs={"s3": {"bucket": bucket}})
    (adapter,) = [a for a in publish_run(run, plan_for(job, env)) if a["kind"] == "adapter"]
    s3_server.client().put_object(Bucket=bucket, Key="run-tamper/adapter/adapter_config.json", Body=b'{"r": 4096}')

    with pytest.raises(PublishError, match="adapter_config.json") as err:
        pull(adapter["uri"], env)
    assert "altered or corrupted" in err.value.hint
    assert not any(p.name == adapter["sha256_manifest"] for p in (env_volume(env) / "cache" / "adapters").iterdir())


def test_a_prefix_without_manifest_is_never_pulled(env, bucket, s3_server):
    s3_server.client().put_object(Bucket=bucket, Key="half/adapter/adapter_model.safetensors", Body=b"x" * 100)
    with pytest.raises(PublishError, match="no manifest.json"):
        pull(f"s3://{bucket}/half/adapter", env)


def published_8mib_adapter(tmp_path, tiny_adapter, env, bucket, run_id: str) -> dict:
    """The adapter record of a run whose adapter carries 8 MiB of weights, published straight (no proxy)."""
    run = make_run_dir(tmp_path, tiny_adapter)
    (run / "adapter" / "weights.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    return next(
        a
        for a in publish_run(run, plan_for(make_job(run_id, outputs={"s3": {"bucket": bucket}}), env))
        if a["kind"] == "adapter"
    )


def test_large_file_goes_up_in_parallel_parts_and_comes_back_intact(tiny_adapter, tmp_path, env, bucket, proxy):
    run = make_run_dir(tmp_path, tiny_adapter)
    big = run / "adapter" / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    proxied = {**env, "BUCKET_ENDPOINT_URL": proxy.url}
    events = []
    artifacts = publish_run(
        run, plan_for(make_job("run-big", outputs={"s3": {"bucket": bucket}}), proxied), progress=events.append
    )
    (adapter,) = [a for a in artifacts if a["kind"] == "adapter"]
    assert proxy.parts_seen >= 5  # 24 MiB in 5 MiB parts
    last = [e for e in events if e["what"] == "upload adapter"][-1]
    assert last["stage"] == "publish" and last["bytes_done"] == last["bytes_total"] == adapter["bytes"]
    pulled = pull(adapter["uri"], proxied)
    assert (pulled.path / "big.bin").read_bytes() == big.read_bytes()


def test_concurrent_pulls_download_once(tiny_adapter, tmp_path, env, bucket, proxy):
    adapter = published_8mib_adapter(tmp_path, tiny_adapter, env, bucket, "run-conc")
    proxied = {**env, "BUCKET_ENDPOINT_URL": proxy.url}
    results, errors = [], []

    def one():
        try:
            results.append(pull(adapter["uri"], proxied))
        except Exception as e:  # collected: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.path for r in results}) == 1 and sum(not r.cached for r in results) == 1
    assert proxy.bytes_down < 1.5 * adapter["bytes"]  # one download, plus four small manifests


def test_wrong_secret_fails_fast_with_a_hint(tiny_adapter, tmp_path, env, bucket):
    run = make_run_dir(tmp_path, tiny_adapter)
    job = make_job("run-auth", outputs={"s3": {"bucket": bucket}})
    with pytest.raises(PublishError) as err:
        publish_run(run, plan_for(job, {**env, "BUCKET_SECRET_ACCESS_KEY": "wrong-secret"}))
    assert "SignatureDoesNotMatch" in err.value.message and "BUCKET_SECRET_ACCESS_KEY" in err.value.hint
    assert not err.value.retryable and "wrong-secret" not in json.dumps(err.value.as_result())


def test_job_credentials_win_over_the_environment(tiny_adapter, tmp_path, env, bucket, s3_server):
    run = make_run_dir(tmp_path, tiny_adapter)
    creds = {"aws_access_key_id": s3_server.key, "aws_secret_access_key": s3_server.secret}
    job = make_job(
        "run-creds", outputs={"s3": {"bucket": bucket, "endpoint_url": s3_server.endpoint_url}}, credentials=creds
    )
    bad_env = {k: v for k, v in env.items() if not k.startswith("BUCKET_")} | {
        "AWS_ACCESS_KEY_ID": "nobody",
        "AWS_SECRET_ACCESS_KEY": "nothing",
    }
    artifacts = publish_run(run, plan_for(job, bad_env))
    assert {a["kind"] for a in artifacts} == {"adapter", "logs"}


def test_concurrent_ftw_pull_processes_download_once(tiny_adapter, tmp_path, env, bucket, proxy):
    import subprocess
    import sys

    from tests.conftest import REPO, child_env

    adapter = published_8mib_adapter(tmp_path, tiny_adapter, env, bucket, "run-procs")
    cmd = [sys.executable, "-m", "worker.cli", "pull", adapter["uri"], "--json"]
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env=child_env(**{**env, "BUCKET_ENDPOINT_URL": proxy.url}), stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    records = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({r["path"] for r in records}) == 1 and sum(not r["cached"] for r in records) == 1
    assert proxy.bytes_down < 1.5 * adapter["bytes"]


def test_missing_bucket_is_named_and_not_retried(tiny_adapter, tmp_path, env):
    run = make_run_dir(tmp_path, tiny_adapter)
    with pytest.raises(PublishError) as err:
        publish_run(
            run,
            plan_for(
                make_job("run-nobucket", outputs={"s3": {"bucket": "no-such-bucket"}}),
                {**env, "FTW_PUBLISH_BACKOFF_S": "30"},
            ),
        )
    assert "NoSuchBucket" in err.value.message and "outputs.s3.bucket" in err.value.hint and not err.value.retryable


def test_s3config_credentials_reach_the_store_through_the_plan_alone(
    tiny_adapter, tmp_path, env, bucket, s3_server, monkeypatch
):
    """RunPod's s3Config names the bucket, the endpoint and the key pair; the endpoint's env has none, and
    the process env holds a wrong AWS key pair that boto3's own chain would take: the client must use
    the plan's explicit pair, and nothing is put into the process env."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nothing")
    for name in ("BUCKET_NAME", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    endpoint_env = {k: v for k, v in env.items() if not k.startswith("BUCKET_")}
    s3_config = {
        "bucketName": bucket,
        "accessId": s3_server.key,
        "accessSecret": s3_server.secret,
        "endpointUrl": s3_server.endpoint_url,
    }
    before = dict(os.environ)
    run = make_run_dir(tmp_path, tiny_adapter, checkpoints=(3,))
    plan = plan_for(make_job("run-s3config", publish=["adapter", "checkpoints"]), endpoint_env, s3_config)
    artifacts = publish_run(run, plan)
    assert {a["kind"] for a in artifacts} == {"adapter", "checkpoints", "logs"}
    assert all(a["uri"].startswith(f"s3://{bucket}/run-s3config/") for a in artifacts)
    assert "run-s3config/adapter/manifest.json" in objects(s3_server, bucket)
    assert dict(os.environ) == before

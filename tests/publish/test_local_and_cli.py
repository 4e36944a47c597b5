"""The local store (the default target), `ftw pull` as a real subprocess, and the vLLM adapter check."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env
from tests.publish.conftest import make_job, make_run_dir, plan_for
from worker.errors import InfraError, PublishError
from worker.publish import publish_run, pull
from worker.publish.manifest import Manifest
from worker.publish.vllm_check import check_adapter


def local_env(env):
    return {k: v for k, v in env.items() if not k.startswith("BUCKET_")}


def test_local_store_is_the_default_and_pull_verifies_it(tiny_adapter, tmp_path, env, volume):
    run = make_run_dir(tmp_path, tiny_adapter, merged=True)
    artifacts = publish_run(run, plan_for(make_job("loc-1", publish=["adapter", "merged"]), local_env(env)))
    by_kind = {a["kind"]: a for a in artifacts}
    assert set(by_kind) == {"adapter", "merged", "logs"} and all(a["target"] == "local" for a in artifacts)
    store = volume.resolve() / "store" / "loc-1"
    assert by_kind["adapter"]["uri"] == f"file://{store / 'adapter'}"
    assert Manifest.of_folder(store / "adapter").sha256 == by_kind["adapter"]["sha256_manifest"]
    assert not [p for p in store.iterdir() if p.name.startswith((".tmp-", ".old-"))]

    assert pull("loc-1", local_env(env)).path == store / "adapter"
    (store / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(PublishError, match="does not match its manifest"):
        pull(by_kind["adapter"]["uri"], local_env(env))


def test_missing_merged_folder_fails_before_anything_is_published(tiny_adapter, tmp_path, env, volume):
    run = make_run_dir(tmp_path, tiny_adapter)
    with pytest.raises(PublishError, match="merged/ is missing") as err:
        publish_run(run, plan_for(make_job("loc-2", publish=["adapter", "merged"]), local_env(env)))
    assert "merge_lora: true" in err.value.hint
    assert not (volume / "store").exists()


def run_ftw_pull(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "pull", *args],
        cwd=REPO,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ftw_pull_cli(tiny_adapter, tmp_path, env, bucket):
    run = make_run_dir(tmp_path, tiny_adapter)
    (adapter,) = [
        a
        for a in publish_run(run, plan_for(make_job("cli-1", outputs={"s3": {"bucket": bucket}}), env))
        if a["kind"] == "adapter"
    ]
    out = tmp_path / "pulled"
    done = run_ftw_pull("cli-1", str(out), "--json", env={**env, "BUCKET_NAME": bucket})
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["sha256_manifest"] == adapter["sha256_manifest"] and record["path"] == str(out)
    assert Manifest.of_folder(out).files == Manifest.of_folder(run / "adapter").files

    again = run_ftw_pull(adapter["uri"], str(out), "--json", env=env)  # the same artifact: nothing to do
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1]) == {**record, "source": adapter["uri"], "cached": True}
    (out / "adapter_config.json").write_text("{}")
    not_empty = run_ftw_pull(adapter["uri"], str(out), env=env)
    assert not_empty.returncode == 1 and "not empty and does not hold this artifact" in not_empty.stderr
    assert (out / "adapter_config.json").read_text() == "{}"  # what was there is left alone
    for bad in ("s3://", "s3:///prefix"):
        refused = run_ftw_pull(bad, env=env)
        assert (
            refused.returncode == 1
            and "Traceback" not in refused.stderr
            and "hint: write s3://BUCKET" in refused.stderr
        )
    missing = run_ftw_pull(f"s3://{bucket}/nope/adapter", env=env)
    assert missing.returncode == 1 and "no manifest.json" in missing.stderr and "hint:" in missing.stderr
    assert run_ftw_pull(env=env).returncode == 2


def test_vllm_check_passes_a_plain_lora_and_names_what_to_change(tiny_adapter, tmp_path):
    assert check_adapter(tiny_adapter) == []
    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(r=128, modules_to_save=["embed_tokens", "lm_head"], target_modules=["q_proj", "lm_head"], use_dora=True)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    warnings = check_adapter(bad)
    text = " ".join(warnings)
    assert len(warnings) == 4
    assert "rank 128" in text and "--max-lora-rank 128" in text and "modules_to_save" in text
    assert "lora_modules_to_save" in text and "DoRA" in text and "lm_head" in text
    assert not any("rank" in w for w in check_adapter(bad, 256))


def test_vllm_warnings_reach_the_result(tiny_adapter, tmp_path, env):
    run = make_run_dir(tmp_path, tiny_adapter)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 96}))
    (adapter,) = [a for a in publish_run(run, plan_for(make_job("loc-3"), local_env(env))) if a["kind"] == "adapter"]
    assert any("rank 96" in w for w in adapter["warnings"])


def test_full_fine_tune_publishes_the_model_folder(tiny_adapter, tmp_path, env, volume):
    run = make_run_dir(tmp_path, tiny_adapter)
    shutil.move(run / "adapter", run / "model")
    job = make_job("loc-full", adapter=None, lora_r=8)
    (model,) = [a for a in publish_run(run, plan_for(job, local_env(env))) if a["kind"] != "logs"]
    assert model["kind"] == "model" and model["uri"].endswith("/store/loc-full/model") and "warnings" not in model
    assert pull("loc-full", local_env(env), kind="model").manifest_sha256 == model["sha256_manifest"]


def test_ftw_pull_takes_options_after_the_positionals(tiny_adapter, tmp_path, env, volume):
    run = make_run_dir(tmp_path, tiny_adapter)
    publish_run(run, plan_for(make_job("order-1"), local_env(env)))
    out = tmp_path / "logs"
    done = run_ftw_pull("order-1", "--kind", "logs", str(out), "--json", env=local_env(env))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["path"] == str(out)
    assert Manifest.of_folder(out).files == Manifest.of_folder(volume.resolve() / "store" / "order-1" / "logs").files


def test_pulling_a_kind_the_run_did_not_publish_names_what_it_did(tiny_adapter, tmp_path, env, volume):
    run = make_run_dir(tmp_path, tiny_adapter)
    publish_run(run, plan_for(make_job("kinds-1"), local_env(env)))  # publishes adapter (and logs), no merged
    wrong_kind = run_ftw_pull("kinds-1", str(tmp_path / "m"), "--kind", "merged", env=local_env(env))
    assert wrong_kind.returncode == 1
    assert "did not publish merged" in wrong_kind.stderr and "holds only adapter, logs" in wrong_kind.stderr
    assert "--kind adapter" in wrong_kind.stderr and "BUCKET_NAME" not in wrong_kind.stderr

    absent = run_ftw_pull("never-ran", str(tmp_path / "n"), env=local_env(env))
    assert absent.returncode == 1
    assert "not in the local store" in absent.stderr and "BUCKET_NAME" in absent.stderr


def test_a_store_folder_that_is_a_symlink_out_of_the_volume_is_refused(tiny_adapter, tmp_path, env, volume):
    """As the run folder's: a link planted at BASE_VOLUME/store/<run_id> is neither written nor read through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (volume / "store").mkdir(parents=True, exist_ok=True)
    (volume / "store" / "linked-1").symlink_to(outside)
    run = make_run_dir(tmp_path, tiny_adapter)
    with pytest.raises(InfraError, match="is a symlink") as err:
        publish_run(run, plan_for(make_job("linked-1"), local_env(env)))
    assert "replace the link" in err.value.hint and list(outside.iterdir()) == []
    shutil.copytree(tiny_adapter, outside / "adapter")
    Manifest.of_folder(outside / "adapter").write(outside / "adapter")
    refused = run_ftw_pull("linked-1", env=local_env(env))
    assert refused.returncode == 1 and "is a symlink" in refused.stderr and "Traceback" not in refused.stderr


def test_ftw_pull_help_says_what_happens_without_a_folder():
    shown = subprocess.run(
        [sys.executable, "-m", "worker.cli", "pull", "--help"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert (
        "Without DIR nothing is copied" in shown
        and "cache/adapters" in shown
        and "holds exactly this artifact" in shown
    )


def test_ftw_pull_without_s3_credentials_says_so_at_once(tmp_path):
    env = {
        "BASE_VOLUME": str(tmp_path / "v"),
        "BUCKET_ENDPOINT_URL": "http://127.0.0.1:1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "FTW_PUBLISH_BACKOFF_S": "0.05",
    }
    done = run_ftw_pull("s3://bucket/run-1/adapter", env=env)
    assert done.returncode == 1 and "no S3 credentials" in done.stderr and "BUCKET_ACCESS_KEY_ID" in done.stderr
    assert "retrying" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ftw_pull_stopped_while_the_store_does_not_answer_exits_130_without_a_traceback(tmp_path, signum):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    env = {
        "BASE_VOLUME": str(tmp_path / "v"),
        "BUCKET_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "BUCKET_ACCESS_KEY_ID": "id",
        "BUCKET_SECRET_ACCESS_KEY": "secret",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "pull", "s3://bucket/run-1/adapter", str(tmp_path / "d")],
        cwd=REPO,
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        silent.settimeout(60)
        conn, _ = silent.accept()  # the pull is now waiting on the store
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        conn.close()
    finally:
        proc.kill()
        silent.close()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "d").exists()

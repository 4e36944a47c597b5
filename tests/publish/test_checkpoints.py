"""Checkpoints uploaded while training runs, rotated in the bucket, and restored when the volume is gone."""

from __future__ import annotations

import shutil
import time

from tests.publish.conftest import add_checkpoint, make_job, make_run_dir, plan_for
from worker.publish import publish_run, restore_checkpoint, start_uploader
from worker.publish.checkpoints import complete_checkpoints
from worker.publish.manifest import Manifest


def remote_checkpoints(s3_server, bucket: str, run_id: str) -> dict[str, bool]:
    """checkpoint name → whether its manifest exists."""
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{run_id}/checkpoints/")
    out: dict[str, bool] = {}
    for o in listing.get("Contents", []):
        name = o["Key"].split("/")[2]
        out[name] = out.get(name, False) or o["Key"].endswith("/manifest.json")
    return out


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_uploader_publishes_each_complete_checkpoint_once_and_rotates(tiny_adapter, tmp_path, env, bucket, s3_server):
    run = make_run_dir(tmp_path, tiny_adapter)
    job = make_job("ckpt-1", outputs={"s3": {"bucket": bucket}}, publish=["adapter", "checkpoints"], save_total_limit=2)
    uploader = start_uploader(run, plan_for(job, env), interval_s=0.2)
    add_checkpoint(run, 1)
    (run / "checkpoints" / ".tmp-checkpoint-2").mkdir()  # being written: not complete
    (run / "checkpoints" / "checkpoint-3").mkdir()  # renamed but without ftw_state.json: not complete
    wait_for(lambda: remote_checkpoints(s3_server, bucket, "ckpt-1").get("checkpoint-1"))
    assert set(remote_checkpoints(s3_server, bucket, "ckpt-1")) == {"checkpoint-1"}
    add_checkpoint(run, 4)
    add_checkpoint(run, 5)
    artifacts = publish_run(run, plan_for(job, env), uploader=uploader)  # stops the uploader after a last sweep

    assert remote_checkpoints(s3_server, bucket, "ckpt-1") == {"checkpoint-4": True, "checkpoint-5": True}
    ckpts = sorted(a["step"] for a in artifacts if a["kind"] == "checkpoints")
    assert ckpts == [4, 5]
    assert {a["kind"] for a in artifacts} == {"adapter", "logs", "checkpoints"}


def test_restore_brings_back_the_newest_checkpoint_when_the_volume_is_lost(
    tiny_adapter, tmp_path, env, bucket, s3_server
):
    run = make_run_dir(tmp_path, tiny_adapter, checkpoints=(10, 20))
    job = make_job("ckpt-2", outputs={"s3": {"bucket": bucket}}, publish=["checkpoints"])
    publish_run(run, plan_for(job, env))
    # a half-uploaded newer checkpoint (no manifest) must be ignored
    s3_server.client().put_object(Bucket=bucket, Key="ckpt-2/checkpoints/checkpoint-30/optimizer.pt", Body=b"partial")
    expected = Manifest.of_folder(run / "checkpoints" / "checkpoint-20")

    fresh = tmp_path / "fresh-run"  # a new worker: the volume is gone
    restored = restore_checkpoint(fresh, plan_for(job, env))
    assert restored == fresh / "checkpoints" / "checkpoint-20"
    assert Manifest.of_folder(restored).files == expected.files
    assert [s for s, _ in complete_checkpoints(fresh)] == [20]
    assert restore_checkpoint(fresh, plan_for(job, env)) is None  # local is as new as the bucket: nothing to do


def test_restore_keeps_a_newer_local_checkpoint(tiny_adapter, tmp_path, env, bucket):
    run = make_run_dir(tmp_path, tiny_adapter, checkpoints=(5,))
    job = make_job("ckpt-3", outputs={"s3": {"bucket": bucket}}, publish=["checkpoints"])
    publish_run(run, plan_for(job, env))
    add_checkpoint(run, 6)
    assert restore_checkpoint(run, plan_for(job, env)) is None
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run / "checkpoints" / "checkpoint-5")
    assert restore_checkpoint(run, plan_for(job, env)) == run / "checkpoints" / "checkpoint-5"


def test_uploader_without_s3_does_nothing(tiny_adapter, tmp_path, env):
    run = make_run_dir(tmp_path, tiny_adapter, checkpoints=(1,))
    job = make_job("ckpt-4", publish=["adapter", "checkpoints"])
    env = {k: v for k, v in env.items() if not k.startswith("BUCKET_")}
    assert start_uploader(run, plan_for(job, env)).stop() == []
    assert restore_checkpoint(run, plan_for(job, env)) is None


def test_checkpoints_not_asked_for_are_resume_insurance_only(tiny_adapter, tmp_path, env, bucket, s3_server):
    run = make_run_dir(tmp_path, tiny_adapter)
    job = make_job("ckpt-5", outputs={"s3": {"bucket": bucket}}, publish=["adapter"])
    uploader = start_uploader(run, plan_for(job, env), interval_s=0.2)
    add_checkpoint(run, 7)
    wait_for(lambda: remote_checkpoints(s3_server, bucket, "ckpt-5").get("checkpoint-7"))
    fresh = tmp_path / "fresh"  # while training runs, a lost volume can resume from the bucket
    assert restore_checkpoint(fresh, plan_for(job, env)) == fresh / "checkpoints" / "checkpoint-7"
    artifacts = publish_run(run, plan_for(job, env), uploader=uploader)
    assert {a["kind"] for a in artifacts} == {"adapter", "logs"}
    assert remote_checkpoints(s3_server, bucket, "ckpt-5") == {}  # removed once the publish succeeded

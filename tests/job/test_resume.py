"""Cancel mid-training, kill -9 of the train child, and the resubmissions that resume — real children.

The cancel goes the way RunPod's does: the SDK cancels the asyncio task running the handler's
generator (`stream_job`), which must not let go before the training child has saved and is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest

import handler
from tests.job.conftest import example_job
from worker.errors import PublishError, RunInUse
from worker.job import publishing
from worker.job.children import newest_checkpoint
from worker.job.pipeline import run_job
from worker.job.rundir import open_run_dir
from worker.job.supervisor import StopSignal

pytestmark = pytest.mark.slow
GRACE_S = 30.0
CONFIG = {"max_steps": 40, "save_steps": 2, "sequence_len": 64, "micro_batch_size": 2, "logging_steps": 1}


def live_children(ignore: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """This process's live descendants, except `ignore` (servers other tests' fixtures started)
    and the worker's stage template (kept for the next job; worker/job/template.py)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in ignore:
            continue
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.name() != "ftw-template":
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def train_child() -> psutil.Process:
    found = [
        p for p in live_children() if "worker.train" in " ".join(p.cmdline()) or p.name() == "worker.train"
    ]  # forked: named
    assert found, "the train child is not running (it finished before the test could stop it: raise max_steps)"
    return found[0]


async def cancel_at_train_step(job: dict, step: int) -> tuple[list[dict], float]:
    seen: list[dict] = []
    reached = asyncio.Event()

    async def consume() -> None:
        async for item in handler.stream_job({"id": "rp-job-1", "input": job}):
            seen.append(item)
            if item.get("stage") == "train" and item.get("step", 0) >= step:
                reached.set()

    task = asyncio.create_task(consume())
    waiter = asyncio.create_task(reached.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED, timeout=600)
    assert reached.is_set(), seen[-5:]
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return seen, time.monotonic() - started


def test_cancel_then_kill_9_then_resume(demo_volume, monkeypatch):
    monkeypatch.setenv("FTW_PROGRESS_INTERVAL_S", "0")
    monkeypatch.setenv("FTW_STREAM_INTERVAL_S", "0")  # the cancel waits on a streamed step update
    monkeypatch.setenv("FTW_STOP_GRACE_S", str(GRACE_S))
    job = example_job(run_id="resume", config=CONFIG)
    run_dir = demo_volume / "runs" / "resume"
    threads_before = {t.ident for t in threading.enumerate()}  # servers of other tests' fixtures may run
    before = frozenset(p.pid for p in live_children())

    # 1. RunPod cancel mid-training: a checkpoint is saved, the children are gone in grace + 5 s.
    seen, took = asyncio.run(cancel_at_train_step(job, 2))
    assert took < GRACE_S + 5
    assert live_children(before) == []
    first = json.loads((run_dir / "result.json").read_text())
    assert (
        first["status"] == "cancelled" and first["error"]["code"] == "cancelled" and first["error"]["stage"] == "train"
    )
    saved = newest_checkpoint(run_dir)
    assert saved is not None and saved >= 2 and first["error"]["details"]["checkpoint_step"] == saved

    # 2. Resubmitted; kill -9 of the train child once it has gone past the checkpoint.
    updates: list[dict] = []

    def kill_when_past(update: dict) -> None:
        updates.append(update)
        if (
            update.get("stage") == "train"
            and update.get("step", 0) >= saved + 1
            and not getattr(kill_when_past, "done", False)
        ):
            kill_when_past.done = True
            os.kill(train_child().pid, signal.SIGKILL)

    second = run_job({"input": job}, on_progress=kill_when_past)
    assert any(u.get("message") == f"resuming from checkpoint-{saved}" for u in updates)
    assert "preprocess_s" not in second["timings"]  # the prepared cache of attempt 1 was used
    assert second["status"] == "failed" and second["error"]["code"] == "crash" and second["error"]["retryable"]
    assert "SIGKILL" in second["error"]["message"] and "step" in second["error"]["log_tail"]
    assert live_children(before) == []
    newest = newest_checkpoint(run_dir)
    assert newest >= saved

    # 3. Resubmitted again: resumes from the newest complete checkpoint and finishes.
    third = run_job({"input": job})
    assert third["status"] == "completed", third
    assert third["metrics"]["resumed_from_step"] == newest and third["metrics"]["steps"] == CONFIG["max_steps"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    attempts = sorted(p.name for p in (run_dir / "logs" / "train").iterdir())
    assert attempts == ["attempt-1", "attempt-2", "attempt-3"]
    assert sorted(p.name for p in (run_dir / "logs" / "preprocess").iterdir()) == ["attempt-1"]
    left = [
        t.name
        for t in threading.enumerate()
        if t.ident not in threads_before and ("ftw-" in t.name or "_pump" in t.name)
    ]
    assert left == [], f"threads left behind: {left}"  # no uploader, pump, publish or release threads

    # 4. A finished run is read-only: resubmits that come while another holds its folder all report it done.
    holder = open_run_dir(demo_volume, "resume")
    try:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            again = list(pool.map(lambda _: run_job({"input": job}), range(5)))
    finally:
        holder.close()
    assert [r["status"] for r in again] == ["completed"] * 5, again
    assert all(r["artifacts"] == third["artifacts"] and r["metrics"] == third["metrics"] for r in again)


def test_preempted_run_resumes_on_a_new_volume_from_the_published_checkpoint(demo_volume, s3_server, monkeypatch):
    bucket = s3_server.make_bucket("ftw-job-restore")
    for key, value in {**s3_server.env(), "FTW_PROGRESS_INTERVAL_S": "0", "FTW_STOP_GRACE_S": str(GRACE_S)}.items():
        monkeypatch.setenv(key, value)
    job = example_job(run_id="restore", outputs={"s3": {"bucket": bucket, "prefix": "runs"}}, config=CONFIG)

    # 1. SIGTERM-style preemption at step 2: the train child saves, its checkpoint goes to the bucket.
    stop = StopSignal()
    first = run_job(
        {"input": job},
        stop=stop,
        on_progress=lambda u: u.get("stage") == "train" and u.get("step", 0) >= 2 and stop.request("preempted"),
    )
    assert first["status"] == "preempted" and first["error"]["retryable"], first
    step = first["error"]["details"]["checkpoint_step"]
    manifest = f"runs/restore/checkpoints/checkpoint-{step}/manifest.json"
    assert s3_server.client().head_object(Bucket=bucket, Key=manifest)["ContentLength"] > 0

    # 2. The volume is lost (a new worker): only the base model and data are there again.
    shutil.rmtree(demo_volume / "runs")
    shutil.rmtree(demo_volume / "cache", ignore_errors=True)
    updates: list[dict] = []
    second = run_job({"input": job}, on_progress=updates.append)
    assert second["status"] == "completed", second
    assert any(u.get("message") == "restored the newest published checkpoint" for u in updates)
    assert second["metrics"]["resumed_from_step"] == step and second["metrics"]["steps"] == CONFIG["max_steps"]
    adapter = next(a for a in second["artifacts"] if a["kind"] == "adapter")
    assert adapter["target"] == "s3" and adapter["uri"] == f"s3://{bucket}/runs/restore/adapter"


def test_publish_time_limit_fails_clearly_and_the_resubmit_publishes_without_retraining(
    demo_volume, s3_server, monkeypatch
):
    bucket = s3_server.make_bucket("ftw-job-publish-limit")
    before = frozenset(p.pid for p in live_children())  # servers the fixtures started
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    config = {**CONFIG, "max_steps": 2, "save_steps": None}
    job = example_job(
        run_id="publish-limit",
        outputs={"s3": {"bucket": bucket, "prefix": "runs"}},
        config=config,
        limits={"publish_s": 0.001},
    )
    monkeypatch.setattr(publishing, "LET_GO_S", 0.2)  # the job returns while the upload is still stuck
    with s3_server.frozen(hold_s=3.0) as freeze:  # the upload cannot finish within the limit, however fast
        first = run_job({"input": job}, on_progress=lambda u: u.get("stage") == "publish" and freeze())
        with pytest.raises(RunInUse):  # no resubmit can publish beside the stuck upload
            open_run_dir(demo_volume, "publish-limit")
    assert first["status"] == "failed", first
    error = first["error"]
    assert error["code"] == PublishError.code and error["stage"] == "publish"
    assert "limits.publish_s" in error["message"] and "resubmit the same run_id" in error["hint"]
    assert live_children(before) == []
    deadline = time.monotonic() + 60
    while any(t.name == "ftw-release" for t in threading.enumerate()):  # the upload resumed, stops, unlocks
        assert time.monotonic() < deadline, "the run folder was never unlocked"
        time.sleep(0.1)

    updates: list[dict] = []
    second = run_job({"input": {**job, "limits": {"publish_s": 600}}}, on_progress=updates.append)
    assert second["status"] == "completed", second
    assert not any(u.get("stage") == "train" and u.get("step") for u in updates), "training ran again"
    assert (
        next(a for a in second["artifacts"] if a["kind"] == "adapter")["uri"]
        == f"s3://{bucket}/runs/publish-limit/adapter"
    )


def test_a_bucket_that_cannot_be_listed_does_not_stop_training(demo_volume, s3_server, monkeypatch):
    """The checkpoint restore lists the bucket before training; a permanent S3 error there (here: no such
    bucket) leaves training to go on from the volume and fails only the publish, saying which key to fix."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    job = example_job(
        run_id="no-bucket",
        outputs={"s3": {"bucket": "ftw-no-such-bucket", "prefix": "runs"}},
        config={**CONFIG, "max_steps": 2, "save_steps": None},
    )
    updates: list[dict] = []
    result = run_job({"input": job}, on_progress=updates.append)
    assert result["status"] == "failed" and result["error"]["stage"] == "publish", result
    assert "NoSuchBucket" in result["error"]["message"] and "outputs.s3.bucket" in result["error"]["hint"]
    assert any(u.get("stage") == "train" and u.get("step") == 2 for u in updates), "training did not run"

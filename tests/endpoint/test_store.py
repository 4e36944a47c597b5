"""The job store's rules, with the clock passed in: ttl, executionTimeout, lost workers, persistence."""

from __future__ import annotations

import stat

from worker.devtools.endpoint.store import JobStore


def make(tmp_path, **kw):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create({"input": {"x": 1}}, kw.get("webhook"), kw.get("timeout_ms", 6000), kw.get("ttl_ms", 20_000))
    return store, job


def test_ttl_expires_a_queued_job_counted_from_submission(tmp_path):
    store, job = make(tmp_path, webhook="http://127.0.0.1:1/h", ttl_ms=20_000)
    assert store.expire(job.created_at + 19.9, worker_lost_s=60) == []
    assert store.expire(job.created_at + 20.1, worker_lost_s=60) == [job.id]
    expired = store.get(job.id)
    assert expired.status == "TIMED_OUT" and "ttl of 20000 ms" in expired.error
    [hook] = store.due_webhooks(expired.finished_at + 1)
    assert hook["url"] == "http://127.0.0.1:1/h" and '"status":"TIMED_OUT"' in hook["body"]


def test_execution_timeout_counts_from_the_start_and_signals_the_worker_until_it_confirms(tmp_path):
    store, job = make(tmp_path, timeout_ms=6000)
    [taken] = store.take("w1", 1)
    assert store.expire(taken.started_at + 5.9, worker_lost_s=60) == []
    assert store.stop_signals("w1", taken.started_at + 5.9) == []
    assert store.expire(taken.started_at + 6.1, worker_lost_s=60) == [job.id]
    assert store.get(job.id).status == "TIMED_OUT"
    now = taken.started_at + 6.2
    assert store.stop_signals("w2", now) == []
    assert store.stop_signals("w1", now) == [job.id]
    assert store.stop_signals("w1", now + 1) == []
    assert store.stop_signals("w1", now + 2.1) == [job.id]  # repeated: the SDK drops a stop that comes too early
    assert store.stop_unconfirmed(job.id)  # /retry waits for this: the old attempt must be stopped first
    store.worker_idle("w1")  # job-take with job_in_progress=0
    assert store.stop_signals("w1", now + 10) == [] and not store.stop_unconfirmed(job.id)


def test_a_stop_no_worker_confirms_is_given_up_after_a_minute(tmp_path):
    store, job = make(tmp_path)
    store.take("gone", 1)
    store.cancel(job.id)
    assert store.stop_unconfirmed(job.id)
    store.expire(store.get(job.id).finished_at + 61, worker_lost_s=120)
    assert not store.stop_unconfirmed(job.id) and store.stop_signals("gone", 1e12) == []


def test_a_job_fails_when_its_worker_stops_sending_heartbeats(tmp_path):
    store, job = make(tmp_path, timeout_ms=600_000, ttl_ms=600_000)
    [taken] = store.take("silent", 1)
    assert store.expire(taken.started_at + 200, worker_lost_s=120) == []  # never pinged: a sync handler may block
    store.pinged("silent", job.id)
    [(last_ping,)] = store.db.execute("SELECT last_ping FROM workers WHERE id = 'silent'").fetchall()
    assert store.expire(last_ping + 119, worker_lost_s=120) == []
    assert store.expire(last_ping + 121, worker_lost_s=120) == [job.id]
    lost = store.get(job.id)
    assert lost.status == "FAILED" and "no heartbeat" in lost.error and f"/retry/{job.id}" in lost.error


def test_a_late_result_does_not_overwrite_a_cancel(tmp_path):
    store, job = make(tmp_path)
    store.take("w1", 1)
    store.cancel(job.id)
    assert store.owned_in_progress(job.id, "w1") is None
    assert store.get(job.id).status == "CANCELLED"


def test_stream_items_are_handed_out_once_and_retry_starts_afresh(tmp_path):
    store, job = make(tmp_path)
    store.take("w1", 1)
    for step in (1, 2):
        store.append_stream(job.id, {"step": step})
    assert store.read_stream(job.id) == [{"step": 1}, {"step": 2}]
    store.append_stream(job.id, {"step": 3})
    assert store.read_stream(job.id) == [{"step": 3}]
    store.finish(store.get(job.id), None, "boom")
    retried = store.retry(job.id)
    assert (retried.status, retried.retries, retried.error, retried.worker_id) == ("IN_QUEUE", 1, None, None)
    assert store.read_stream(job.id) == []


def test_everything_survives_reopening_the_file(tmp_path):
    store, done = make(tmp_path, webhook="http://127.0.0.1:1/h")
    running = store.create({"input": {"y": 2}, "s3Config": {"bucketName": "b"}}, None, 6000, 20_000)
    queued = store.create({"input": {"z": 3}}, None, 6000, 20_000)
    store.take("w1", 2)
    store.append_stream(running.id, {"step": 1})
    store.finish(store.get(done.id), {"ok": True}, None)
    store.close()

    again = JobStore(tmp_path / "jobs.sqlite3")
    assert again.get(done.id).status_body()["output"] == {"ok": True}
    assert again.get(running.id).status == "IN_PROGRESS"
    assert again.get(running.id).work_item() == {"id": running.id, "input": {"y": 2}, "s3Config": {"bucketName": "b"}}
    assert again.read_stream(running.id) == [{"step": 1}]
    assert [j.id for j in again.take("w2", 5)] == [queued.id]
    assert len(again.due_webhooks(1e12)) == 1
    assert stat.S_IMODE((tmp_path / "jobs.sqlite3").stat().st_mode) == 0o600  # job inputs may hold secrets


def test_a_file_from_before_stop_sent_at_is_upgraded_on_open(tmp_path):
    import sqlite3

    from worker.devtools.endpoint import database

    old_schema = database.SCHEMA.replace(
        "    stop_sent_at REAL,                        -- last time the stop channel carried it\n", ""
    )
    assert old_schema != database.SCHEMA
    sqlite3.connect(tmp_path / "jobs.sqlite3").executescript(old_schema)
    store, job = make(tmp_path)
    store.take("w1", 1)
    store.cancel(job.id)
    assert store.stop_signals("w1", 1e12) == [job.id]

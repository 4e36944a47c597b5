"""RunPod entry of the ftw training worker: `python handler.py` (the image's CMD).

Thin on purpose: the job runs in `worker.job.pipeline.run_job`, the same function `ftw run` calls.
This file only adapts it to the runpod SDK:

- `stream_job` is an async generator: each progress update (stage, step, loss, tokens/s, ETA; every
  2 s or 5% of the steps) is posted with `runpod.serverless.progress_update`, so /status shows it
  as the output while the job runs; stage changes and one step update per 10 s are also yielded to
  RunPod's stream; the last item is the result `{run_id, status: "completed",
  artifacts, metrics, timings, ...}`. With `return_aggregate_stream` the job's output is the list of
  items, so the result is `output[-1]`. A failed job yields `{"error": "<JSON>"}` last, which the
  SDK turns into a FAILED job whose error is that JSON: `{run_id, status, code, stage, message,
  hint, retryable, log_tail, details}`.
- Cancellation (RunPod's /cancel reaches the task as CancelledError) and SIGTERM (preemption) stop
  the running stage: SIGTERM to its process group, a grace period to checkpoint, then SIGKILL.
- The SDK's local test mode (`python handler.py --test_input '{"input": ...}'` or ./test_input.json)
  does not run generators, so there the non-streaming `run_to_result` is registered instead.

The job input: see schemas/job.py (`config`/`args`, `outputs`, `publish`, `run_id`, `limits`, ...)
and RunPod's `s3Config`. This process never imports torch or transformers.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

from schemas.secrets import child_env
from worker.job import template
from worker.job.pipeline import run_job
from worker.job.supervisor import StopSignal
from worker.job.updates import ProgressSink, Throttle, format_line

POLL_S = 0.2
STREAM_INTERVAL_S = (
    10.0  # every streamed item is kept in the job's aggregated output: a day stays under ~2 MB (FTW_STREAM_INTERVAL_S)
)
RUNNING: set[StopSignal] = set()
_sigterm_forwarding = False


def forward_sigterm() -> None:
    """Chain our SIGTERM reaction (preempt running jobs) in front of the SDK's own shutdown handler."""
    global _sigterm_forwarding
    if _sigterm_forwarding or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        for stop in list(RUNNING):
            stop.request("preempted")
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_forwarding = True


def final_item(result: dict[str, Any]) -> dict[str, Any]:
    if result.get("status") == "completed":
        return result
    error = result.get("error") or {}
    return {
        "error": json.dumps(
            {"run_id": result.get("run_id"), "status": result.get("status"), **error, "timings": result.get("timings")}
        )
    }


def status_poster(job: dict[str, Any]) -> ProgressSink:
    """RunPod's way to show progress on /status while a job runs (platform mode only)."""
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return lambda update: None
    from runpod.serverless import progress_update

    def post(update: dict[str, Any]) -> None:
        try:
            progress_update(job, update)
        except Exception as e:  # /status is a view of the job: a failed post must not fail the training
            print(
                f"ftw: progress_update failed ({type(e).__name__}: {e}); the job goes on", file=sys.stderr, flush=True
            )

    return post


async def stream_job(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    stop = StopSignal()
    updates: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    outcome: dict[str, Any] = {}
    post_status, to_stream = (
        status_poster(job),
        Throttle(updates.put, float(os.environ.get("FTW_STREAM_INTERVAL_S") or STREAM_INTERVAL_S)),
    )

    def on_progress(update: dict[str, Any]) -> None:
        post_status(update)
        to_stream(update)

    def work() -> None:
        try:
            outcome["result"] = run_job(
                job.get("input"),
                job_id=job.get("id"),
                s3_config=job.get("s3Config"),
                on_progress=on_progress,
                stop=stop,
            )
        finally:
            to_stream.flush()

    forward_sigterm()
    thread = threading.Thread(target=work, name=f"ftw-job-{job.get('id')}", daemon=True)
    RUNNING.add(stop)
    thread.start()
    try:
        while thread.is_alive():
            while not updates.empty():
                yield updates.get()
            await asyncio.sleep(POLL_S)
    except asyncio.CancelledError:
        stop.request("cancelled")
        await asyncio.to_thread(thread.join)  # the stage is stopped and its children gone before we let go
        raise
    except GeneratorExit:
        stop.request("cancelled")
        thread.join()
        raise
    finally:
        RUNNING.discard(stop)
    while not updates.empty():
        yield updates.get()
    yield final_item(outcome["result"])


async def run_to_result(job: dict[str, Any]) -> dict[str, Any]:
    """The same job without streaming (the SDK's local test mode): progress to stderr, result returned."""
    last: dict[str, Any] = {}
    async for item in stream_job(job):
        if item.get("type") == "progress":
            print(format_line(item), file=sys.stderr, flush=True)
        last = item
    return last


def local_test_mode(argv: list[str], env: dict[str, str]) -> bool:
    """The SDK runs one job from --test_input/test_input.json and exits (no generator support)."""
    if "--rp_serve_api" in argv:
        return False
    return "--test_input" in argv or not env.get("RUNPOD_WEBHOOK_GET_JOB")


def main() -> None:
    # The SDK logs at DEBUG by default, and its local test mode then prints the whole job — credentials
    # included. INFO keeps them out of the worker's log; an operator may still ask for more.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    # progress_update (/status) every 2 s or 5% of the steps; the stream thins them to one per 10 s
    os.environ.setdefault("FTW_PROGRESS_INTERVAL_S", "2")
    local = local_test_mode(sys.argv, dict(os.environ))
    if not local:  # the stage template imports while the SDK imports (~2 s) and the worker waits for its first job
        template.shared(child_env(dict(os.environ), {}, {}))
    import runpod

    handler = run_to_result if local else stream_job
    runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})


if __name__ == "__main__":
    main()

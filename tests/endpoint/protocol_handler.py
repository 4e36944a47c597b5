"""A small runpod handler for the endpoint protocol tests, run as `python protocol_handler.py`.

HANDLER_KIND=generator (default): an async generator; each step is yielded (job-stream) and the
aggregate is the output. HANDLER_KIND=progress: an async function that reports steps with
runpod.serverless.progress_update and returns a dict. Input: {"steps", "step_s", "mode"} with
mode "ok" | "fail" (raises after the steps) | "child" (starts a child process, streams its pid,
waits for it; a stop from the endpoint cancels the task and the child's group is killed) |
"block" (progress handler: blocks the SDK's event loop for "block_s" seconds, a stuck worker).
HANDLER_CONCURRENCY=N (default 1): jobs at once; above 1 the SDK takes jobs with job-take-batch.
"""

import asyncio
import os
import signal
import threading
import time

import runpod


async def start_child() -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec("sleep", "600", start_new_session=True)


async def stop_child(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        os.killpg(child.pid, signal.SIGTERM)
        await child.wait()


async def generator_handler(job):
    args = job["input"]
    steps = args.get("steps", 3)
    for step in range(1, steps + 1):
        await asyncio.sleep(args.get("step_s", 0.1))
        yield {"stage": "train", "step": step, "total_steps": steps, "loss": round(1.0 / step, 4)}
    if args.get("mode") == "fail":
        raise RuntimeError("the test handler failed on purpose")
    if args.get("mode") == "child":
        child = await start_child()
        yield {"child_pid": child.pid}
        try:
            await child.wait()
        finally:
            await stop_child(child)
    yield {"result": {"echo": args.get("echo"), "s3": bool(job.get("s3Config"))}}


async def posted_in_order(job, update) -> None:
    """progress_update posts from a new thread per call, so two calls can land out of order and the
    last can land after the result; waiting for each thread makes the updates arrive as they were made."""
    before = set(threading.enumerate())
    runpod.serverless.progress_update(job, update)
    posting = [t for t in set(threading.enumerate()) - before if "_thread_target" in t.name]
    await asyncio.to_thread(lambda: [t.join(30) for t in posting])


async def progress_handler(job):
    args = job["input"]
    steps = args.get("steps", 3)
    for step in range(1, steps + 1):
        await asyncio.sleep(args.get("step_s", 0.1))
        await posted_in_order(job, {"stage": "train", "step": step, "total_steps": steps})
    if args.get("mode") == "block":
        time.sleep(args.get("block_s", 30))  # on purpose: nothing else in this worker runs meanwhile
    if args.get("mode") == "fail":
        return {"error": "the test handler failed on purpose"}
    return {"result": {"echo": args.get("echo")}}


if __name__ == "__main__":
    concurrency = int(os.environ.get("HANDLER_CONCURRENCY", "1"))
    config = {"concurrency_modifier": lambda current: concurrency}
    if os.environ.get("HANDLER_KIND", "generator") == "generator":
        runpod.serverless.start({**config, "handler": generator_handler, "return_aggregate_stream": True})
    else:
        runpod.serverless.start({**config, "handler": progress_handler})

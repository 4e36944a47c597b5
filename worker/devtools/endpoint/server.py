"""A local RunPod serverless endpoint: the client API and the worker API, over one job store.

Two keys, as on RunPod: clients send the endpoint's API key (FTW_ENDPOINT_API_KEY); each worker
sends its own worker token, `worker_token(FTW_ENDPOINT_WORKER_KEY, worker_id)` (its RUNPOD_AI_API_KEY),
valid only on the worker routes of that worker id. So a client key cannot take a job (and read
its credentials) or forge a result, and a worker can report only on jobs it took itself.

Client face (what `runpod.Endpoint` and curl call, `Authorization: Bearer KEY`):
    POST /v2/{endpoint}/run          {input, webhook?, policy?: {executionTimeout, ttl, lowPriority}, s3Config?}
    POST /v2/{endpoint}/runsync      same, waits ?wait=ms (default 90000, 1000..300000) for the result
    GET  /v2/{endpoint}/status/{id}  {id, status, delayTime, executionTime, workerId, output | error}
    GET  /v2/{endpoint}/stream/{id}  {id, status, stream: [{output}, ...]} — items not yet read
    POST /v2/{endpoint}/cancel/{id}  POST /v2/{endpoint}/retry/{id} (FAILED / TIMED_OUT without secrets, same id)
    GET  /v2/{endpoint}/health       POST /v2/{endpoint}/purge-queue
Worker face (what the runpod worker SDK calls in platform mode; see `worker_urls`):
    GET  job-take/{worker}?…&job_in_progress=0|1      one job as {id, input, s3Config?} or 204
    GET  job-take-batch/{worker}?…&batch_size=N       a list of jobs or 204
    GET  job-stop/{worker}?…                          {"jobsToStop": [ids]} or 204 (long-poll)
    POST job-done/{worker}/{id}?…&isStream=…          {output} | {error} | {status: IN_PROGRESS, output}
    POST job-stream/{worker}/{id}?…                   {output}
    GET  ping/{worker}?job_id=…&runpod_version=…
Take and stop are long-polls, so a worker gets a job or a stop signal within milliseconds.
Every error is a JSON `{"error": "..."}` with the right status; nothing logs a job's input or a key.
Differences from RunPod: finished jobs stay in the database (RunPod drops results 30 min after
completion); /purge-queue ends queued jobs as CANCELLED (RunPod removes them); a job
that times out or is cancelled is stopped through the worker's stop channel only, so a handler
that blocks the SDK's event loop (a sync handler) runs on until it returns (RunPod would stop the
worker), and what it then reports is discarded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from worker.devtools.endpoint.scrub import RESUBMIT_WITH_SECRETS
from worker.devtools.endpoint.store import IN_PROGRESS, RETRYABLE, STOP_REPEAT_S, TERMINAL, Job, JobStore
from worker.devtools.endpoint.validation import DAY_MS, MB, fail, json_errors, parse_request, read_json
from worker.devtools.endpoint.webhooks import WebhookSender

log = logging.getLogger("ftw.endpoint")
T = TypeVar("T")


@dataclass(frozen=True)
class EndpointSettings:
    api_key: str  # clients'
    worker_key: str  # workers' tokens derive from it (worker_token)
    endpoint_id: str = "local"
    max_run_bytes: int = 10 * MB  # RunPod: /run 10 MB, /runsync 20 MB
    max_runsync_bytes: int = 20 * MB
    default_execution_timeout_ms: int = 600_000  # RunPod's default: 10 minutes
    default_ttl_ms: int = DAY_MS
    take_wait_s: float = 20.0  # how long job-take and job-stop hold a request open
    stop_wait_s: float = 20.0
    worker_lost_s: float = 120.0  # no heartbeat for this long: the worker's job fails
    webhook_attempts: int = 3  # RunPod: the first POST and 2 retries, 10 s apart
    webhook_retry_delay_s: float = 10.0
    sweep_interval_s: float = 0.25


def worker_urls(base_url: str, endpoint_id: str) -> dict[str, str]:
    """The RUNPOD_WEBHOOK_* variables a runpod worker needs to work for this endpoint."""
    root = f"{base_url.rstrip('/')}/v2/{endpoint_id}"
    return {
        "RUNPOD_WEBHOOK_GET_JOB": f"{root}/job-take/$ID?gpu=local",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{root}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{root}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
        "RUNPOD_WEBHOOK_PING": f"{root}/ping/$RUNPOD_POD_ID?gpu=local",
    }


def worker_token(worker_key: str, worker_id: str) -> str:
    """The key one worker sends (RUNPOD_AI_API_KEY): it names that worker and no other."""
    return "ftw-worker-" + hmac.new(worker_key.encode(), worker_id.encode(), hashlib.sha256).hexdigest()


class Endpoint:
    def __init__(self, store: JobStore, settings: EndpointSettings):
        self.store = store
        self.settings = settings
        self._changed = asyncio.Event()
        self.closing = False

    # ---- plumbing ----------------------------------------------------------------------------
    def changed(self) -> None:
        """Wake every long-poll: something in the store moved."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, probe: Callable[[], T], timeout: float, tick: float | None = None) -> T:
        """`probe()` on every change (and every `tick` s) until it is truthy or `timeout` passes."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            event = self._changed
            result = probe()
            remaining = deadline - asyncio.get_running_loop().time()
            if result or remaining <= 0 or self.closing:
                return result
            try:
                await asyncio.wait_for(event.wait(), min(remaining, tick or remaining))
            except TimeoutError:
                pass

    @web.middleware
    async def auth(self, request: web.Request, handler):
        header = request.headers.get("Authorization", "")
        if not header:
            raise fail(
                401,
                "missing Authorization header: send 'Authorization: Bearer <key>' with the endpoint's "
                "API key (FTW_ENDPOINT_API_KEY where the endpoint runs)",
            )
        key = (header[7:] if header[:7].lower() == "bearer " else header).strip().encode()
        worker_id = request.match_info.get("worker_id")
        if worker_id is not None:
            if not hmac.compare_digest(key, worker_token(self.settings.worker_key, worker_id).encode()):
                raise fail(
                    401,
                    f"this is a worker route: it takes the worker token of worker {worker_id[:64]!r} "
                    "(its RUNPOD_AI_API_KEY, from FTW_ENDPOINT_WORKER_KEY), not a client's API key",
                )
        elif not hmac.compare_digest(key, self.settings.api_key.encode()):
            raise fail(
                401,
                "invalid API key for this endpoint (clients send FTW_ENDPOINT_API_KEY; a worker's "
                "token is valid on its worker routes only)",
            )
        if request.match_info.get("endpoint") not in (None, self.settings.endpoint_id):
            raise fail(
                404,
                f"no endpoint {request.match_info['endpoint']!r} here; this one is "
                f"{self.settings.endpoint_id!r} (set RUNPOD_ENDPOINT_ID to it)",
            )
        return await handler(request)

    def job_or_404(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise fail(404, f"no job with id {job_id!r} on this endpoint")
        return job

    # ---- client face -------------------------------------------------------------------------
    def submit(self, body: Any, id_prefix: str = "") -> Job:
        payload, webhook, execution_timeout, ttl = parse_request(
            body, self.settings.default_execution_timeout_ms, self.settings.default_ttl_ms
        )
        job = self.store.create(payload, webhook, execution_timeout, ttl, id_prefix=id_prefix)
        log.info(
            "job %s IN_QUEUE (executionTimeout %d ms, ttl %d ms%s)",
            job.id,
            execution_timeout,
            ttl,
            ", webhook" if webhook else "",
        )
        self.changed()
        return job

    async def run(self, request: web.Request) -> web.Response:
        job = self.submit(await read_json(request, self.settings.max_run_bytes))
        return web.json_response({"id": job.id, "status": job.status})

    async def runsync(self, request: web.Request) -> web.Response:
        try:
            wait_ms = int(request.query.get("wait", 90_000))
        except ValueError:
            raise fail(400, "wait must be an integer number of milliseconds") from None
        if not 1000 <= wait_ms <= 300_000:
            raise fail(400, f"wait must be in [1000, 300000] ms, got {wait_ms}")
        job = self.submit(await read_json(request, self.settings.max_runsync_bytes), id_prefix="sync-")
        done = await self.wait_for(lambda: (j := self.store.get(job.id)) and j.status in TERMINAL and j, wait_ms / 1000)
        if done:
            return web.json_response(done.status_body())
        current = self.store.get(job.id)
        return web.json_response({"id": job.id, "status": current.status if current else job.status})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.job_or_404(request.match_info["job_id"]).status_body())

    async def stream(self, request: web.Request) -> web.Response:
        job = self.job_or_404(request.match_info["job_id"])
        items = self.store.read_stream(job.id)
        job = self.job_or_404(job.id)  # status after the read: a terminal status means the stream is complete
        return web.json_response({"id": job.id, "status": job.status, "stream": [{"output": o} for o in items]})

    async def cancel(self, request: web.Request) -> web.Response:
        job = self.job_or_404(request.match_info["job_id"])
        if job.status not in TERMINAL:
            job = self.store.cancel(job.id)  # type: ignore[assignment]
            log.info("job %s CANCELLED by the client", job.id)
            self.changed()
        return web.json_response({"id": job.id, "status": job.status})

    async def retry(self, request: web.Request) -> web.Response:
        job = self.job_or_404(request.match_info["job_id"])
        if job.status not in RETRYABLE:
            raise fail(409, f"job {job.id} is {job.status}; only FAILED or TIMED_OUT jobs can be retried")
        if job.removed_secrets:
            raise fail(
                409,
                f"job {job.id} carried {', '.join(sorted(job.removed_secrets))}, which the endpoint deletes "
                f"when a job ends (no secret is kept at rest); {RESUBMIT_WITH_SECRETS}",
            )
        if self.store.stop_unconfirmed(job.id):
            raise fail(
                409,
                f"job {job.id}'s worker has not yet confirmed that it stopped the previous attempt; "
                "retry in a few seconds",
            )
        job = self.store.retry(job.id)
        log.info("job %s IN_QUEUE again (retry %d)", job.id, job.retries)
        self.changed()
        return web.json_response({"id": job.id, "status": job.status})

    async def health(self, request: web.Request) -> web.Response:
        alive_after = time.time() - max(60.0, 3 * self.settings.stop_wait_s)
        return web.json_response({"jobs": self.store.counts(), "workers": self.store.workers(alive_after)})

    async def purge_queue(self, request: web.Request) -> web.Response:
        removed = self.store.purge_queue()
        log.info("purged %d queued job(s)", removed)
        self.changed()
        return web.json_response({"removed": removed, "status": "completed"})

    # ---- worker face -------------------------------------------------------------------------
    async def job_take(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        batch = request.path.rsplit("/", 2)[-2] == "job-take-batch"
        try:
            count = max(1, int(request.query.get("batch_size", 1))) if batch else 1
        except ValueError:
            raise fail(400, "batch_size must be an integer") from None
        self.store.seen(worker_id)
        if request.query.get("job_in_progress") == "0":
            self.store.worker_idle(worker_id)
        jobs = await self.wait_for(lambda: self.store.take(worker_id, count), self.settings.take_wait_s)
        if not jobs:
            return web.Response(status=204)
        for job in jobs:
            log.info(
                "job %s IN_PROGRESS on worker %s%s", job.id, worker_id, f" (batch of {len(jobs)})" if batch else ""
            )
        self.changed()
        items = [job.work_item() for job in jobs]
        return web.json_response(items if batch else items[0])

    async def job_stop(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        self.store.seen(worker_id)
        await self.wait_for(
            lambda: self.store.has_stop_signal(worker_id, time.time()),
            self.settings.stop_wait_s,
            tick=STOP_REPEAT_S / 2,
        )
        ids = self.store.stop_signals(worker_id, time.time())
        if not ids:
            return web.Response(status=204)
        log.info("worker %s told to stop %s", worker_id, ", ".join(ids))
        return web.json_response({"jobsToStop": ids})

    async def worker_result(self, request: web.Request) -> tuple[Job, Any]:
        """The job a worker posts about (it must be the one running it) and the posted body."""
        worker_id, job_id = request.match_info["worker_id"], request.match_info["job_id"]
        self.store.seen(worker_id)
        body = await read_json(request, self.settings.max_runsync_bytes, strict=False)  # ftw's own output
        job = self.job_or_404(job_id)
        if self.store.owned_in_progress(job_id, worker_id) is None:
            raise fail(409, f"job {job_id} is {job.status} (worker {job.worker_id}); this result is discarded")
        if not isinstance(body, dict):
            raise fail(400, "a worker posts a JSON object: {output} or {error}")
        return job, body

    async def job_done(self, request: web.Request) -> web.Response:
        job, body = await self.worker_result(request)
        if body.get("status") == IN_PROGRESS:  # runpod.serverless.progress_update
            self.store.set_progress(job.id, body.get("output"))
        else:
            error = body.get("error")
            if error is not None and not isinstance(error, str):
                error = json.dumps(error)
            job = self.store.finish(job, body.get("output"), error or None)
            log.info("job %s %s", job.id, job.status)
        self.changed()
        return web.json_response({})

    async def job_stream(self, request: web.Request) -> web.Response:
        job, body = await self.worker_result(request)
        self.store.append_stream(job.id, body.get("output"))
        self.changed()
        return web.json_response({})

    async def ping(self, request: web.Request) -> web.Response:
        self.store.pinged(request.match_info["worker_id"], request.query.get("job_id", ""))
        return web.json_response({})

    # ---- the clock ---------------------------------------------------------------------------
    async def sweep(self) -> None:
        """executionTimeout, ttl and lost workers, checked a few times a second."""
        while True:
            for job_id in self.store.expire(time.time(), self.settings.worker_lost_s):
                job = self.store.get(job_id)
                log.info("job %s %s: %s", job_id, job.status if job else "?", job.error if job else "")
                self.changed()
            await asyncio.sleep(self.settings.sweep_interval_s)


def create_app(store: JobStore, settings: EndpointSettings) -> web.Application:
    endpoint = Endpoint(store, settings)
    app = web.Application(middlewares=[json_errors, endpoint.auth], client_max_size=settings.max_runsync_bytes + MB)
    root = "/v2/{endpoint}"
    job = "{job_id:[^/]+}"
    app.add_routes(
        [
            web.post(f"{root}/run", endpoint.run),
            web.post(f"{root}/runsync", endpoint.runsync),
            web.get(f"{root}/status/{job}", endpoint.status),
            web.post(f"{root}/status/{job}", endpoint.status),
            web.get(f"{root}/stream/{job}", endpoint.stream),
            web.post(f"{root}/stream/{job}", endpoint.stream),
            web.post(f"{root}/cancel/{job}", endpoint.cancel),
            web.post(f"{root}/retry/{job}", endpoint.retry),
            web.get(f"{root}/health", endpoint.health),
            web.post(f"{root}/purge-queue", endpoint.purge_queue),
            web.get(f"{root}/job-take/{{worker_id}}", endpoint.job_take),
            web.get(f"{root}/job-take-batch/{{worker_id}}", endpoint.job_take),
            web.get(f"{root}/job-stop/{{worker_id}}", endpoint.job_stop),
            web.post(f"{root}/job-done/{{worker_id}}/{job}", endpoint.job_done),
            web.post(f"{root}/job-stream/{{worker_id}}/{job}", endpoint.job_stream),
            web.get(f"{root}/ping/{{worker_id}}", endpoint.ping),
        ]
    )

    async def background(app: web.Application):
        store.refresh_workers()
        sender = WebhookSender(store, settings.webhook_attempts, settings.webhook_retry_delay_s)
        tasks = [asyncio.create_task(endpoint.sweep()), asyncio.create_task(sender.run())]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sender.close()

    async def release_long_polls(app: web.Application):
        endpoint.closing = True
        endpoint.changed()

    app.cleanup_ctx.append(background)
    app.on_shutdown.append(release_long_polls)
    return app

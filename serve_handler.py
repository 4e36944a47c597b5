"""RunPod entry of the serving worker (thin): start the engine child, then the RunPod job loop.

Accepted job inputs (schemas/serve.py):
- `{"openai_route": "/v1/chat/completions" | "/v1/completions" | "/v1/models", "openai_input": {...}}`
  — RunPod's OpenAI-compatible route; `model` is the base model or an adapter (Hub
  `org/repo[@rev]`, `s3://bucket/prefix`, a run id, a preloaded name); `stream: true` yields SSE
  strings (`data: {...}\\n\\n`), as worker-vllm does.
- `{"messages": [[...], ...], "n", "temperature", "top_p", "max_tokens", "generation_kwargs", "model"?}`
  — the batch shape: one output dict.
A bad request yields `{"error": {message, type, code, hint?}}`, which fails that job only.
Settings: environment variables, see worker/serve/settings.py. This process never imports vLLM
or torch; the engine runs as a child on loopback and gets SIGTERM when the worker stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from worker.errors import FtwError
from worker.serve.service import running_service
from worker.serve.settings import ServeSettings


def stop_when_engine_dies(engine) -> None:
    """A worker whose engine died must not take more jobs: log why, then stop (RunPod starts a fresh one)."""
    code = engine.proc.wait()
    if engine.stopping:
        return
    reason = engine.failure_reason(chars=50_000)  # its last words, not an old request's error
    print(
        f"serve_handler: the {engine.engine} engine exited with code {code}"
        + (f" ({reason})" if reason else "")
        + "; stopping this worker\n"
        f"--- engine log tail ---\n{engine.log_tail()}",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    import runpod

    try:
        settings = ServeSettings.from_env()
    except FtwError as e:
        print(f"serve_handler: {e.message}\nhint: {e.hint}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds running_service: the engine is stopped
    try:
        with running_service(settings) as service:
            threading.Thread(target=stop_when_engine_dies, args=(service.engine,), daemon=True).start()
            asyncio.run(preload(service.app))

            async def handler(job):
                async for output in service.app.handle_job(job["input"]):
                    yield output

            runpod.serverless.start(
                {
                    "handler": handler,
                    "concurrency_modifier": lambda current: settings.concurrency(service.engine.engine),
                    "return_aggregate_stream": True,
                }
            )
    except FtwError as e:  # the engine did not start: say why, with its last log lines
        print(f"serve_handler: {e.message}\nhint: {e.hint}\n--- engine log tail ---\n{e.log_tail}", file=sys.stderr)
        return 1
    return 0


async def preload(app) -> None:
    try:
        await app.preload()
    finally:
        await app.client.close()  # this loop ends here; RunPod's loop opens its own session


if __name__ == "__main__":
    sys.exit(main())

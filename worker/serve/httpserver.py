"""`ftw serve`'s body: the serving worker behind a local HTTP server (the same engine and requests as serve_handler.py).

    ftw serve --model DIR_OR_ID [--engine auto|vllm|transformers] [--port 8000] [--host 127.0.0.1]

Routes: POST /v1/chat/completions, /v1/completions (stream or not), GET /v1/models, POST /v1/batch
(the batch shape), POST /runsync (a RunPod job body `{"input": ...}`, answered `{"output": ...}`),
GET /health. Every other setting comes from the environment (worker/serve/settings.py); the
flags override MODEL_NAME, FTW_SERVE_ENGINE and FTW_SERVE_PYTHON. Ctrl-C stops the engine too.
"""

from __future__ import annotations

import os
import sys

from aiohttp import web

from schemas.limits import DocumentError, parse_json
from schemas.serve import RequestInvalid, parse_batch, parse_route
from worker.errors import FtwError, Outcome, ServeError
from worker.serve.app import ServeApp, error_body

MAX_BODY_BYTES = 64 * 2**20  # a long context's prompt fits many times over


def http_app(app: ServeApp) -> web.Application:
    """aiohttp routes over a ServeApp (also used by tests and bench/serve.py)."""

    async def read_json(request: web.Request):
        """The body within schemas/limits.py's limits: a body nested thousands deep, a key given twice,
        NaN or a lone surrogate is a 400 that says so, never a crash or a silent pick."""
        try:
            return parse_json(await request.read(), "the request body", max_bytes=MAX_BODY_BYTES)
        except DocumentError as e:
            raise ServeError(str(e), hint="send one JSON object, UTF-8 encoded, as the OpenAI API takes it") from e

    def openai_route(route: str):
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await read_json(request) if request.method == "POST" else None
            parsed = parse_route(route, body)
            events = app.run(route, parsed)
            first = await anext(events)  # every refusal comes before it: answered with its status by `errors`
            if not getattr(parsed, "stream", False):
                return web.json_response(first)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            await response.write(first.encode())
            async for event in events:  # a failure after this point arrives as an error event, then [DONE]
                await response.write(event.encode())
            await response.write_eof()
            return response

        return handle

    async def batch(request: web.Request) -> web.Response:
        parsed = parse_batch(await read_json(request))
        return web.json_response(await anext(app.run(None, parsed)))

    async def runsync(request: web.Request) -> web.Response:
        body = await read_json(request)
        outputs = [out async for out in app.handle_job(body.get("input") if isinstance(body, dict) else body)]
        failed = next((o for o in outputs if isinstance(o, dict) and "error" in o), None)
        if failed:
            return web.json_response({"status": "FAILED", **failed})
        return web.json_response({"status": "COMPLETED", "output": outputs if len(outputs) > 1 else outputs[0]})

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except RequestInvalid as e:
            return web.json_response(error_body(e), status=400)
        except ServeError as e:
            return web.json_response(error_body(e), status=e.status)

    web_app = web.Application(middlewares=[errors], client_max_size=MAX_BODY_BYTES)
    web_app.router.add_post("/v1/chat/completions", openai_route("/v1/chat/completions"))
    web_app.router.add_post("/v1/completions", openai_route("/v1/completions"))
    web_app.router.add_get("/v1/models", openai_route("/v1/models"))
    web_app.router.add_post("/v1/batch", batch)
    web_app.router.add_post("/runsync", runsync)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "adapters": app.adapters.names()})

    web_app.router.add_get("/health", health)
    return web_app


def serve_http(model: str | None, engine: str | None, python: str | None, host: str, port: int) -> Outcome:
    """`ftw serve`'s body: the flags override MODEL_NAME, FTW_SERVE_ENGINE and FTW_SERVE_PYTHON."""
    from worker.serve.service import running_service
    from worker.serve.settings import ServeSettings

    env = dict(os.environ)
    for key, value in (("MODEL_NAME", model), ("FTW_SERVE_ENGINE", engine), ("FTW_SERVE_PYTHON", python)):
        if value:
            env[key] = value
    try:
        settings = ServeSettings.from_env(env)
        with running_service(settings) as service:

            async def on_startup(_app: web.Application) -> None:
                await service.app.preload()
                print(
                    f"ftw serve: {service.engine.engine} engine ready; listening on http://{host}:{port}",
                    flush=True,
                )

            web_app = http_app(service.app)
            web_app.on_startup.append(on_startup)
            web.run_app(web_app, host=host, port=port, print=None, handler_cancellation=True)
    except FtwError as e:
        print(
            f"ftw serve: {e.code}: {e.message}"
            + (f"\nhint: {e.hint}" if e.hint else "")
            + (f"\n--- engine log tail ---\n{e.log_tail}" if e.log_tail else ""),
            file=sys.stderr,
        )
        return "failed"
    return "ok"

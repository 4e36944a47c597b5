"""The transformers+peft engine behind the same OpenAI-compatible HTTP API as vLLM's server.

    python -m worker.serve.hf_server --model DIR_OR_ID [--served-model-name N] --port P

Routes (the subset ftw's worker uses, shaped as vLLM answers them): GET /health, GET /v1/models,
POST /v1/chat/completions, /v1/completions (stream or not; `chat_template` and
`return_token_ids` as vLLM's extensions), /v1/load_lora_adapter, /v1/unload_lora_adapter, /tokenize.
Bodies arrive already validated by the worker (schemas/serve.py); errors answer
`{"error": {message, type, code}}` with a 4xx status, as vLLM's do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from worker.errors import ServeError
from worker.serve.hf_engine import HFEngine, SamplingSettings
from worker.serve.settings import ENGINE_KEEP_ALIVE_S


def error_response(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "internal_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class HFServer:
    def __init__(self, engine: HFEngine, served_name: str):
        self.engine, self.served_name = engine, served_name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 2**20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/load_lora_adapter", self.load_adapter)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_adapter)
        app.router.add_post("/tokenize", self.tokenize)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ServeError as e:
            return error_response(e.status, e.message + (f" ({e.hint})" if e.hint else ""))
        except (ValueError, KeyError, TypeError) as e:
            return error_response(400, f"bad request: {e}")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        names = [self.served_name, *self.engine.adapters]
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": n,
                        "object": "model",
                        "owned_by": "ftw",
                        "root": self.engine.adapters.get(n, self.served_name),
                        "parent": None if n == self.served_name else self.served_name,
                    }
                    for n in names
                ],
            }
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: the prompt's token count and the context it must fit in."""
        body = await request.json()
        ids = (
            self.engine.chat_prompt(body["messages"], body.get("chat_template"))
            if "messages" in body
            else self.engine.text_prompt(body["prompt"])
        )
        return web.json_response({"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids})

    async def load_adapter(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self._run(self.engine.load_adapter, body["lora_name"], body["lora_path"])
        return web.Response(text=f"adapter {body['lora_name']} loaded")

    async def unload_adapter(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self._run(self.engine.unload_adapter, body["lora_name"])
        return web.Response(text=f"adapter {body['lora_name']} unloaded")

    def _adapter(self, model: str) -> str | None:
        if model == self.served_name:
            return None
        if model not in self.engine.adapters:
            raise ServeError(f"the model {model!r} does not exist", status=404)
        return model

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        adapter = self._adapter(body["model"])
        prompt = self.engine.chat_prompt(body["messages"], body.get("chat_template"))
        return await self._respond(request, body, adapter, [prompt], chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        adapter = self._adapter(body["model"])
        texts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        return await self._respond(request, body, adapter, [self.engine.text_prompt(t) for t in texts], chat=False)

    async def _respond(self, request, body, adapter, prompts: list[list[int]], chat: bool) -> web.StreamResponse:
        sampling = SamplingSettings.from_request(body)
        for p in prompts:
            self.engine.check_length(len(p), sampling.max_tokens)
        n = int(body.get("n") or 1)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.get("stream"):
            return await self._stream(request, body, adapter, prompts, n, sampling, kind, rid)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for p_index, prompt in enumerate(prompts):
            usage["prompt_tokens"] += len(prompt)
            for i in range(n):
                gen = await self._run(self.engine.generate, prompt, adapter, sampling)
                usage["completion_tokens"] += len(gen.token_ids)
                choice: dict[str, Any] = {
                    "index": p_index * n + i,
                    "finish_reason": gen.finish_reason,
                    "logprobs": None,
                }
                choice.update({"message": {"role": "assistant", "content": gen.text}} if chat else {"text": gen.text})
                if body.get("return_token_ids"):
                    choice["token_ids"] = gen.token_ids
                choices.append(choice)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.json_response(
            {
                "id": rid,
                "object": kind,
                "created": int(time.time()),
                "model": body["model"],
                "choices": choices,
                "usage": usage,
            }
        )

    async def _stream(self, request, body, adapter, prompts, n, sampling, kind, rid) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chat = kind == "chat.completion"
        base = {
            "id": rid,
            "object": f"{kind}.chunk" if chat else kind,
            "created": int(time.time()),
            "model": body["model"],
        }

        async def send(choice: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())

        loop = asyncio.get_running_loop()
        completion_tokens = 0
        for p_index, prompt in enumerate(prompts):
            for i in range(n):
                index = p_index * n + i
                queue: asyncio.Queue[int | None] = asyncio.Queue()
                job = loop.run_in_executor(
                    self.pool,
                    lambda p=prompt, q=queue: self.engine.generate(
                        p, adapter, sampling, lambda t: loop.call_soon_threadsafe(q.put_nowait, t)
                    ),
                )
                job.add_done_callback(lambda _f, q=queue: loop.call_soon_threadsafe(q.put_nowait, None))
                if chat:
                    await send({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                sent, ids = "", []
                while (token := await queue.get()) is not None:
                    if token in self.engine.eos_ids:
                        continue
                    ids.append(token)
                    text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
                    if text.endswith("\ufffd") or any(s in text for s in sampling.stop):
                        continue  # an incomplete UTF-8 sequence, or a stop string to cut at the end
                    await send(_delta(chat, index, text[len(sent) :]))
                    sent = text
                gen = await job  # raises the engine's error, if any
                completion_tokens += len(gen.token_ids)
                await send({**_delta(chat, index, gen.text[len(sent) :]), "finish_reason": gen.finish_reason})
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = sum(len(p) for p in prompts)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            await response.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def _delta(chat: bool, index: int, text: str) -> dict[str, Any]:
    if chat:
        return {"index": index, "delta": {"content": text}, "finish_reason": None}
    return {"index": index, "text": text, "finish_reason": None, "logprobs": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.serve.hf_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--keep-alive-s", type=int, default=ENGINE_KEEP_ALIVE_S)
    args = parser.parse_args(argv)
    engine = HFEngine(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    server = HFServer(engine, args.served_model_name or args.model)
    web.run_app(
        server.app(),
        host=args.host,
        port=args.port,
        print=None,
        handle_signals=True,
        handler_cancellation=True,
        keepalive_timeout=args.keep_alive_s,
    )  # closes idle connections as vLLM's uvicorn does
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

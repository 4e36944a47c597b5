"""Request handling shared by serve_handler.py (RunPod) and `ftw serve` (local HTTP).

`ServeApp` takes validated requests (schemas/serve.py), resolves the `model` to the base model or
an adapter (worker/serve/adapters.py), and forwards to the engine child over loopback. Outputs:
- OpenAI routes: the engine's response dict, or for `stream: true` its SSE payload strings;
- the batch shape: `{"model", "outputs": [{"index", "choices": [text, ...], "finish_reasons",
  "usage"} | {"index", "error"}], "usage"}` — a conversation the engine refuses (too long, say)
  gets its own error entry; the others' work is kept.
Every failure a request can cause is a ServeError whose `error_body` is the OpenAI error shape
plus a hint; the engine and the other requests carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from schemas.serve import (
    BatchRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ModelsRequest,
    RequestInvalid,
    ServeRequest,
    parse_request,
)
from worker.errors import ServeError
from worker.serve.adapters import Adapter, AdapterRegistry, Fetch
from worker.serve.engine import EngineClient
from worker.serve.settings import ServeSettings


def error_body(e: ServeError | RequestInvalid) -> dict[str, Any]:
    if isinstance(e, RequestInvalid):
        return {
            "error": {
                "message": f"invalid request: {e}",
                "type": "invalid_request_error",
                "code": 400,
                "details": [i.as_dict() for i in e.issues],
            }
        }
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    param = {"param": "model"} if e.error_code == "model_not_found" else {}
    return {
        "error": {
            "message": e.message,
            "type": kind,
            **param,
            "code": e.error_code or e.status,
            **({"hint": e.hint} if e.hint else {}),
        }
    }


def context_error(prompt_tokens: int, max_tokens: int, max_model_len: int) -> ServeError:
    return ServeError(
        f"this model's maximum context length is {max_model_len} tokens, but the request asks for "
        f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} in the completion)",
        hint="shorten the messages or lower max_tokens",
        error_code="context_length_exceeded",
    )


class ServeApp:
    def __init__(self, settings: ServeSettings, client: EngineClient, fetch: Fetch):
        self.settings, self.client = settings, client
        self.adapters = AdapterRegistry(settings, fetch, self._load, self._unload)

    async def _load(self, adapter: Adapter) -> None:
        await self.client.post("/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": str(adapter.path)})

    async def _unload(self, name: str) -> None:
        await self.client.post("/v1/unload_lora_adapter", {"lora_name": name})

    async def preload(self) -> None:
        """Load FTW_SERVE_ADAPTERS at start; a broken one is reported and skipped, not fatal."""
        for name, _ref in self.settings.preload:
            try:
                await self.adapters.get(name)
            except ServeError as e:
                print(f"ftw serve: preloaded adapter {name!r} skipped: {e.message}", flush=True)

    # ---- the model a request names
    def is_base(self, model: str | None) -> bool:
        return model in (None, self.settings.served_name, self.settings.model)

    def _engine_body(
        self, request: ChatCompletionRequest | CompletionRequest, adapter: Adapter | None
    ) -> dict[str, Any]:
        body = request.model_dump(exclude_none=True)
        body["model"] = adapter.name if adapter else self.settings.served_name
        if adapter and adapter.chat_template and isinstance(request, ChatCompletionRequest):
            body["chat_template"] = adapter.chat_template
        return body

    async def _adapter_for(self, model: str):
        if self.is_base(model):
            return contextlib.nullcontext()
        if not self.settings.enable_lora:
            raise ServeError(
                f"the model {model!r} is not served here (adapters are off: ENABLE_LORA=false)",
                status=404,
                error_code="model_not_found",
            )
        return self.adapters.use(model)

    # ---- the routes
    async def models(self) -> dict[str, Any]:
        names = [self.settings.served_name, *self.adapters.names()]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "owned_by": "ftw", "parent": None if i == 0 else self.settings.served_name}
                for i, n in enumerate(names)
            ],
        }

    async def check_context(self, body: dict[str, Any]) -> None:
        """One rule on both engines: prompt + max_tokens beyond the context is a 400 (vLLM alone would
        shorten max_tokens silently, transformers refuse)."""
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is None:
            return  # the engine fills the context; a prompt that does not fit is its own 400
        if "messages" in body:
            queries = [{k: body[k] for k in ("model", "messages", "chat_template") if k in body}]
        else:
            prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
            queries = [{"model": body["model"], "prompt": p} for p in prompts]
        counts = await asyncio.gather(*(self.client.post("/tokenize", q) for q in queries))
        longest = max(counts, key=lambda c: c["count"])
        if longest["count"] + limit > longest["max_model_len"]:
            raise context_error(longest["count"], limit, longest["max_model_len"])

    async def complete(self, route: str, request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        async with await self._adapter_for(request.model) as adapter:
            body = self._engine_body(request, adapter)
            await self.check_context(body)
            response = await self.client.post(route, body)
        response["model"] = request.model
        return response

    async def stream(self, route: str, request: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[str]:
        """SSE payloads (the text after `data: `), `[DONE]` last, as the engine sends them (named as the request
        named the model)."""
        async with await self._adapter_for(request.model) as adapter:
            body = self._engine_body(request, adapter)
            await self.check_context(body)
            async for payload in self.client.stream(route, body):
                if adapter and payload.startswith("{"):
                    payload = json.dumps({**json.loads(payload), "model": request.model})
                yield payload

    async def stream_events(self, route: str, request: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[str]:
        """SSE events. A failure before the first (bad adapter, the engine's refusal) is raised, so the caller
        answers it with a status; one after it ends the stream as OpenAI's does: an error event, then [DONE]."""
        payloads = self.stream(route, request)
        first = await anext(payloads, None)
        if first is None:
            return
        yield f"data: {first}\n\n"
        try:
            async for payload in payloads:
                yield f"data: {payload}\n\n"
        except ServeError as e:
            yield f"data: {json.dumps(error_body(e))}\n\n"
            yield "data: [DONE]\n\n"

    async def batch(self, request: BatchRequest) -> dict[str, Any]:
        model = request.model or self.settings.served_name
        async with await self._adapter_for(model):
            results = await asyncio.gather(
                *(self._one_conversation(request, model, i, conv) for i, conv in enumerate(request.messages))
            )
        usage = {k: sum(r.get("usage", {}).get(k, 0) for r in results) for k in ("prompt_tokens", "completion_tokens")}
        return {"model": model, "outputs": results, "usage": usage}

    async def _one_conversation(self, request: BatchRequest, model: str, index: int, conversation) -> dict[str, Any]:
        try:
            response = await self.complete("/v1/chat/completions", request.chat_request(model, conversation))
        except ServeError as e:
            return {"index": index, **error_body(e)}
        choices = sorted(response["choices"], key=lambda c: c["index"])
        return {
            "index": index,
            "choices": [c["message"]["content"] for c in choices],
            "finish_reasons": [c["finish_reason"] for c in choices],
            "usage": response.get("usage", {}),
        }

    # ---- one RunPod job
    async def handle_job(self, raw: Any) -> AsyncIterator[Any]:
        """Yields the job's outputs: one dict, or SSE strings for a streamed OpenAI route.

        A dict with an `error` key fails the RunPod job (the SDK's rule) with the message inside.
        """
        try:
            route, request = parse_request(raw)
            async for out in self.run(route, request):
                yield out
        except (ServeError, RequestInvalid) as e:
            yield error_body(e)

    async def run(self, route: str | None, request: ServeRequest) -> AsyncIterator[Any]:
        if isinstance(request, BatchRequest):
            yield await self.batch(request)
        elif isinstance(request, ModelsRequest):
            yield await self.models()
        elif request.stream:
            async for event in self.stream_events(route, request):
                yield event
        else:
            yield await self.complete(route, request)

"""Hostile requests to the serving worker (issue 12's sweep): each is refused with a clear 4xx before any
engine work, and the worker carries on. No engine is started: the refusals come before it is asked."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from schemas.serve import MAX_BATCH_CONVERSATIONS, RequestInvalid, parse_request
from tests.serve.test_requests import serve_app, settings
from worker.errors import AdapterError
from worker.serve.adapters import parse_ref

CHAT = b'{"model": "org/base", "messages": [{"role": "user", "content": "hi"}]'


def post_raw(app, path: str, body: bytes) -> tuple[int, dict]:
    """POST `body` as-is to `ftw serve`'s HTTP routes over a real socket."""
    from tests.s3server import free_port
    from worker.serve.httpserver import http_app

    async def scenario():
        runner = web.AppRunner(http_app(app))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    return r.status, await r.json(content_type=None)
        finally:
            await app.client.close()
            await runner.cleanup()

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    "path, body, says",
    [
        ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, "deep"),
        ("/runsync", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deep"),
        ("/v1/chat/completions", CHAT + b', "max_tokens": 4, "max_tokens": 100000}', "max_tokens"),
        ("/v1/chat/completions", CHAT + b', "top_p": NaN}', "NaN"),
        ("/v1/chat/completions", CHAT + b', "user": "\\ud800"}', "surrogate"),
        ("/v1/chat/completions", CHAT + b', "user": "\xff\xfe"}', "UTF-8"),
    ],
    ids=["deep", "deep-runsync", "duplicate-key", "nan", "lone-surrogate", "invalid-utf8"],
)
def test_hostile_bodies_are_a_400_that_says_why(path, body, says):
    status, answer = post_raw(serve_app(), path, body)
    assert status == 400, answer
    assert says in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error", answer


@pytest.mark.parametrize("model", ["/tmp/a\x00b", "file:///etc/\x00passwd"])
def test_an_adapter_path_with_a_nul_is_refused_not_a_crash(tmp_path, model):
    with pytest.raises(AdapterError) as e:
        parse_ref(model, settings(BASE_VOLUME=str(tmp_path)))
    assert e.value.status == 400 and "NUL" in e.value.message


def test_a_completion_takes_no_more_prompts_than_a_batch_takes_conversations():
    """5,000 prompts in one request kept the transformers engine busy for minutes, every other request waiting."""
    with pytest.raises(RequestInvalid) as e:
        parse_request(
            {
                "openai_route": "/v1/completions",
                "openai_input": {"model": "m", "prompt": ["hi"] * (MAX_BATCH_CONVERSATIONS + 1), "max_tokens": 1},
            }
        )
    assert any(i.loc.startswith("prompt") for i in e.value.issues)


@pytest.mark.parametrize("stop", ["x" * 1_000_000, ["\n", "y" * 300]])
def test_a_stop_sequence_longer_than_the_limit_is_refused_before_the_engine(stop):
    """A 1 MB stop string made transformers build its stop tables for minutes while every other request waited."""
    with pytest.raises(RequestInvalid) as e:
        parse_request({"messages": [[{"role": "user", "content": "hi"}]], "generation_kwargs": {"stop": stop}})
    assert any("256 characters" in i.msg for i in e.value.issues), [str(i) for i in e.value.issues]


@pytest.mark.parametrize(
    "params, loc",
    [
        ({"max_tokens": int("9" * 4000)}, "max_tokens"),
        ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
        ({"seed": 2**70}, "seed"),
    ],
)
def test_out_of_range_integers_are_refused_with_a_short_message(params, loc):
    """A 4,000-digit max_tokens came back whole in the context error; a seed past 64 bits was the engine's overflow."""
    with pytest.raises(RequestInvalid) as e:
        parse_request(
            {
                "openai_route": "/v1/chat/completions",
                "openai_input": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **params},
            }
        )
    assert [i.loc for i in e.value.issues] == [loc] and len(str(e.value)) < 300, str(e.value)

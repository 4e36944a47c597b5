"""The two entry points over the transformers+peft engine: serve_handler.py under the real runpod SDK
(its local API, a real subprocess, SIGTERM) and `ftw serve`'s HTTP routes (real aiohttp server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.conftest import REPO, wait_gone
from tests.s3server import free_port
from tests.serve.conftest import chat, collect, run, serve_env

pytestmark = pytest.mark.slow


def post(url: str, body, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_runpod_handler_serves_adapters_and_stops_its_engine_on_sigterm(
    tiny_model_dir, s3_server, hub_server, published, hf_service, tmp_path
):
    port = free_port()
    env = serve_env(
        tiny_model_dir,
        s3_server,
        hub_server,
        tmp_path / "volume",
        FTW_SERVE_ENGINE="transformers",
        FTW_SERVE_PYTHON=sys.executable,
        FTW_SERVE_ADAPTERS=f"alpha={published.s3['alpha']}",
        PYTHONPATH=str(REPO),
    )
    log = tmp_path / "handler.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "serve_handler.py", "--rp_serve_api", "--rp_api_port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/runsync"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve_handler.py did not start its local API"
            try:
                status, out = post(url, {"input": chat("alpha")}, timeout=60)
                break
            except OSError:
                time.sleep(1)
        assert status == 200 and out["status"] == "COMPLETED", out
        want = only_choice(run(collect(hf_service.app, chat(published.s3["alpha"]))))
        assert out["output"][0]["choices"][0]["token_ids"] == want["token_ids"]  # the preloaded name, same adapter
        assert out["output"][0]["model"] == "alpha"

        _, bad = post(
            url,
            {"input": {"openai_route": "/v1/chat/completions", "openai_input": {"model": "alpha", "messages": "hi"}}},
        )
        assert "messages" in json.dumps(bad) and "error" in json.dumps(bad)
        _, batch = post(
            url,
            {
                "input": {
                    "messages": [[{"role": "user", "content": "hello"}]] * 2,
                    "model": "alpha",
                    "temperature": 0,
                    "max_tokens": 12,
                }
            },
        )
        assert batch["output"][0]["outputs"][1]["choices"] == [want["message"]["content"]]
    finally:
        engine_pids = [child.pid for child in psutil.Process(proc.pid).children()]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert engine_pids, "the handler should have started its engine as a child"
    assert all(wait_gone(pid, 30) for pid in engine_pids)


def only_choice(outputs: list) -> dict:
    assert len(outputs) == 1 and "error" not in outputs[0], outputs
    return outputs[0]["choices"][0]


def test_ftw_serve_http_routes(hf_service, published):
    from worker.serve.httpserver import http_app

    uri = published.s3["digits"]

    async def scenario():
        runner = web.AppRunner(http_app(hf_service.app))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                body = chat(uri)["openai_input"]
                async with http.post(f"{base}/v1/chat/completions", json=body) as r:
                    whole = (await r.json())["choices"][0]["message"]["content"]
                    assert r.status == 200
                async with http.post(
                    f"{base}/v1/chat/completions", json={**body, "stream": True, "return_token_ids": False}
                ) as r:
                    events = [line.decode().strip() for line in [x async for x in r.content] if line.strip()]
                streamed = "".join(
                    json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events if e != "data: [DONE]"
                )
                assert events[-1] == "data: [DONE]" and streamed == whole
                async with http.post(
                    f"{base}/v1/completions", json={"model": uri, "prompt": "hello", "max_tokens": 4, "temperature": 0}
                ) as r:
                    assert r.status == 200 and (await r.json())["object"] == "text_completion"
                async with http.get(f"{base}/v1/models") as r:
                    assert uri in [m["id"] for m in (await r.json())["data"]]
                async with http.post(
                    f"{base}/v1/batch",
                    json={
                        "messages": [[{"role": "user", "content": "hello"}]],
                        "model": uri,
                        "temperature": 0,
                        "max_tokens": 12,
                    },
                ) as r:
                    assert (await r.json())["outputs"][0]["choices"] == [whole]
                async with http.post(f"{base}/runsync", json={"input": chat(uri)}) as r:
                    done = await r.json()
                    assert done["status"] == "COMPLETED" and done["output"]["choices"][0]["message"]["content"] == whole
                async with http.post(f"{base}/runsync", json={"input": {"messages": "hello"}}) as r:
                    assert (await r.json())["status"] == "FAILED"
                async with http.post(f"{base}/v1/chat/completions", data=b"{not json") as r:
                    assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
                async with http.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": 100000}) as r:
                    assert r.status == 400 and "context" in (await r.json())["error"]["message"]
                async with http.post(f"{base}/v1/chat/completions", json={**body, "model": "ghost/adapter"}) as r:
                    assert r.status == 404 and "ghost/adapter" in (await r.json())["error"]["message"]
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_openai_client_sees_refusals_as_openai_errors_before_any_stream(hf_service, published):
    """With the real `openai` client: an unknown model is NotFoundError model_not_found; a streamed request the
    engine refuses is a 400 before the stream starts, not a 200 with an error inside."""
    import openai

    from worker.serve.httpserver import http_app

    async def scenario():
        runner = web.AppRunner(http_app(hf_service.app))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        hello = [{"role": "user", "content": "hello"}]
        try:
            for model in ("ghost/adapter", "no-such-run"):
                with pytest.raises(openai.NotFoundError) as missing:
                    await client.chat.completions.create(model=model, messages=hello, stream=True)
                assert missing.value.code == "model_not_found" and model in missing.value.message
            with pytest.raises(openai.BadRequestError) as too_long:
                await client.chat.completions.create(
                    model=published.s3["alpha"], messages=hello, max_tokens=250, stream=True
                )
            assert too_long.value.code == "context_length_exceeded"
            stream = await client.chat.completions.create(
                model=published.s3["alpha"], messages=hello, max_tokens=4, stream=True
            )
            assert [c.model async for c in stream][-1] == published.s3["alpha"]
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_an_engine_whose_port_was_taken_meanwhile_starts_again_on_a_free_one(
    tiny_model_dir, s3_server, hub_server, tmp_path
):
    from worker.serve.engine import EngineProcess
    from worker.serve.settings import ServeSettings

    env = serve_env(tiny_model_dir, s3_server, hub_server, tmp_path / "volume", FTW_SERVE_PYTHON=sys.executable)
    engine = EngineProcess(ServeSettings.from_env(env), "transformers", log_path=tmp_path / "engine.log")
    taken = engine.port
    with socket.socket() as squatter:  # another program took the port between the pick and the engine's bind
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        engine.start()
        try:
            assert engine.port != taken and engine.url.endswith(f":{engine.port}")
            with urllib.request.urlopen(f"{engine.url}/health", timeout=10) as r:
                assert r.status == 200
            assert "address already in use" in engine.log_tail(100_000).lower()
        finally:
            engine.stop()

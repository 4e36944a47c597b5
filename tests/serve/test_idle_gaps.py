"""Requests after idle gaps around the engine's keep-alive timeout: none dropped (issue 21, item 1).

The engine closes a connection idle for FTW_ENGINE_KEEP_ALIVE_S (5 s; 1 s in tests/serve, so the gaps
are short); a client that reuses it just then (or whose event loop was busy and has not noticed the
close yet) gets ServerDisconnected / connection reset before any byte of the answer. Gaps: just under,
at and just over the timeout, and a busy loop (a blocking call in a handler) across it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import threading
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.s3server import free_port
from tests.serve.conftest import chat, collect, run
from worker.serve.engine import EngineClient


async def bursts_across_gaps(send, gaps: list[float], burst: int = 8) -> list:
    """`burst` concurrent sends, then each gap (negative: the loop blocked that long), then a burst: the failures."""
    failures = []
    for gap in [*gaps, None]:
        results = await asyncio.gather(*(send() for _ in range(burst)), return_exceptions=True)
        failures += [r for r in results if isinstance(r, BaseException) or (isinstance(r, list) and "error" in r[0])]
        if gap is None:
            break
        if gap < 0:
            time.sleep(-gap)  # busy: the engine's close waits unread in the socket
        else:
            await asyncio.sleep(gap)
    return failures


def around(keep_alive_s: float) -> list[float]:
    return [keep_alive_s - 0.2, keep_alive_s, keep_alive_s + 0.2, -(keep_alive_s + 0.5)]


def idle_connection_closed_after(url: str, keep_alive_s: float) -> tuple[bool, bool]:
    """(still open at half the keep-alive, closed by 3 s past it): the engine was given `keep_alive_s`."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        sock = conn.sock
        sock.settimeout(keep_alive_s / 2)
        try:
            open_at_half = sock.recv(1) != b""
        except TimeoutError:
            open_at_half = True
        sock.settimeout(keep_alive_s / 2 + 3)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        return open_at_half, closed
    finally:
        conn.close()


@contextlib.contextmanager
def server_closing_idle_connections(keep_alive_s: float) -> Iterator[str]:
    """A real aiohttp server (own thread, own loop) that closes connections idle for `keep_alive_s`."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/echo", answer)
    runner = web.AppRunner(app, keepalive_timeout=keep_alive_s)
    loop, port, ready = asyncio.new_event_loop(), free_port(), threading.Event()

    def serve() -> None:
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def test_a_connection_dropped_before_the_answer_is_sent_again():
    """A server whose keep-alive is shorter than the client's: the dropped connections are retried."""
    with server_closing_idle_connections(keep_alive_s=1.0) as url:
        client = EngineClient(url)

        async def scenario():
            try:
                return await bursts_across_gaps(lambda: client.post("/v1/echo", {}), around(1.0))
            finally:
                await client.close()

        assert run(scenario()) == []
        assert client.resent > 0  # the busy gap: the loop reused connections the server had closed


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf_service", pytest.param("vllm_service", marks=pytest.mark.vllm)])
def test_no_request_is_dropped_after_idle_gaps_around_the_engines_keep_alive(engine, request, published):
    service = request.getfixturevalue(engine)
    model = published.s3["alpha"]
    client = service.app.client
    keep_alive_s = service.settings.engine_keep_alive_s
    assert idle_connection_closed_after(service.engine.url, keep_alive_s) == (True, True)

    async def scenario():
        resent = client.resent
        failures = await bursts_across_gaps(
            lambda: collect(service.app, chat(model, max_tokens=2)), around(keep_alive_s)
        )
        return failures, client.resent - resent

    failures, resent = run(scenario())
    assert failures == []
    assert resent == 0  # the pool lets connections go before the engine does: nothing had to be sent again

"""Webhook delivery checks the address it connects to (schemas/hosts.py), not only the URL's text.

In-process: the real WebhookSender and aiohttp against a loopback listener. DNS cannot be served
here, so getaddrinfo answers for one made-up public name.
"""

from __future__ import annotations

import asyncio
import socket

from tests.endpoint.conftest import WebhookListener
from worker.devtools.endpoint.store import JobStore
from worker.devtools.endpoint.webhooks import WebhookSender


def deliver(tmp_path, url: str, env: dict[str, str]) -> list[dict]:
    store = JobStore(tmp_path / "hooks.sqlite3")
    sender = WebhookSender(store, attempts=1, retry_delay_s=0, env=env)

    async def once() -> None:
        sender.open()
        try:
            await sender.deliver(1, "job-1", url, '{"status": "COMPLETED"}', 0)
        finally:
            await sender.close()

    store.db.execute("INSERT INTO webhooks (job_id, url, body, next_at) VALUES ('job-1', ?, '{}', 0)", (url,))
    asyncio.run(once())
    return store.webhooks_of("job-1")


def test_a_name_that_resolves_to_loopback_gets_nothing_unless_its_address_is_allowed(tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "hooks.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    listener = WebhookListener()
    try:
        url = listener.url("/rebound").replace("127.0.0.1", "hooks.example.com")
        assert deliver(tmp_path, url, env={})[0]["state"] == "failed"
        assert listener.calls("/rebound") == []
        assert deliver(tmp_path / "allowed", url, env={"FTW_ALLOWED_HOSTS": "127.0.0.1/32"})[0]["state"] == "delivered"
        assert len(listener.calls("/rebound")) == 1
    finally:
        listener.server.shutdown()

"""Webhook delivery as RunPod does it: POST the /status body, retry twice, 10 s apart.

Deliveries live in the job store (enqueued with the terminal transition), so an endpoint restart
resumes the ones still owed. A delivery counts when the receiver answers 2xx.
A webhook goes only to a public host (schemas.hosts, widened by FTW_ALLOWED_HOSTS where the
endpoint runs): checked when the job is submitted, and again at delivery, where the name is
resolved once, every address checked, and the connection made to a checked one; redirects are
not followed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver

from schemas.hosts import allowed_addresses, check_url
from worker.devtools.endpoint.store import JobStore

log = logging.getLogger("ftw.endpoint")


class CheckedResolver(AbstractResolver):
    """Host names resolved once and checked (schemas.hosts); aiohttp connects to what this returns."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        infos = await asyncio.to_thread(allowed_addresses, host.rstrip(".").lower(), port, self.env)
        return [
            {
                "hostname": host,
                "host": address[0],
                "port": address[1],
                "family": fam,
                "proto": proto,
                "flags": socket.AI_NUMERICHOST,
            }
            for fam, _, proto, _, address in infos
        ]

    async def close(self) -> None:
        pass


class WebhookSender:
    def __init__(
        self,
        store: JobStore,
        attempts: int,
        retry_delay_s: float,
        timeout_s: float = 10.0,
        env: Mapping[str, str] | None = None,
    ):
        self.env = os.environ if env is None else env
        self.store = store
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.in_flight: set[int] = set()

    def open(self) -> None:
        """The HTTP session: names resolved by CheckedResolver, no proxy from the environment."""
        connector = aiohttp.TCPConnector(resolver=CheckedResolver(self.env), use_dns_cache=False)
        self.session = aiohttp.ClientSession(timeout=self.timeout, connector=connector, trust_env=False)

    async def run(self, poll_s: float = 0.1) -> None:
        self.open()
        while True:
            for hook in self.store.due_webhooks(time.time()):
                if hook["id"] not in self.in_flight:
                    self.in_flight.add(hook["id"])
                    asyncio.create_task(
                        self.deliver(hook["id"], hook["job_id"], hook["url"], hook["body"], hook["attempts"])
                    )
            await asyncio.sleep(poll_s)

    async def deliver(self, hook_id: int, job_id: str, url: str, body: str, attempts: int) -> None:
        assert self.session is not None
        try:
            if check_url(url, self.env, "webhook"):  # checked at submission; FTW_ALLOWED_HOSTS may have changed since
                raise PermissionError("its host is refused by the host policy (FTW_ALLOWED_HOSTS)")
            async with self.session.post(
                url, data=body, headers={"Content-Type": "application/json"}, allow_redirects=False
            ) as response:
                delivered = 200 <= response.status < 300
                outcome = f"HTTP {response.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            delivered, outcome = False, f"{type(e).__name__}: {e}"
        self.store.webhook_attempted(hook_id, delivered, self.attempts, self.retry_delay_s)
        if delivered:
            log.info("webhook of job %s delivered (attempt %d)", job_id, attempts + 1)
        else:
            left = self.attempts - attempts - 1
            log.warning(
                "webhook of job %s attempt %d failed (%s); %s",
                job_id,
                attempts + 1,
                outcome,
                f"retrying in {self.retry_delay_s:g} s" if left > 0 else "giving up",
            )
        self.in_flight.discard(hook_id)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

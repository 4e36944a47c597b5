"""One serving worker: the engine child plus the ServeApp in front of it (used by both entry points).

    with running_service(ServeSettings.from_env()) as service:
        ... await service.app.handle_job(job_input) ...

Adapters are pulled with `worker.publish.pull` into BASE_VOLUME/cache/adapters (verified against
their manifest, cached by content; the least recently used pruned past FTW_SERVE_CACHE_GB).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.serve.adapters import AdapterRef, Fetch, Fetched
from worker.serve.app import ServeApp
from worker.serve.engine import EngineClient, EngineProcess
from worker.serve.settings import ServeSettings


def pull_fetch(settings: ServeSettings) -> Fetch:
    """Adapters come through the publish stage's pull (one implementation of S3/Hub/local reads)."""

    async def fetch(ref: AdapterRef) -> Fetched:
        from worker.publish.pull import pull

        pulled = await asyncio.to_thread(pull, ref.source, settings.env)
        return Fetched(pulled.path, pulled.manifest_sha256 or str(pulled.path.resolve()))

    return fetch


@dataclass
class Service:
    settings: ServeSettings
    engine: EngineProcess
    app: ServeApp


@contextlib.contextmanager
def running_service(
    settings: ServeSettings, engine: str | None = None, fetch: Fetch | None = None, log_path: Path | None = None
) -> Iterator[Service]:
    process = EngineProcess(settings, engine, log_path=log_path)
    print(
        f"ftw serve: starting the {process.engine} engine for {settings.model}: {process.describe()} "
        f"(log: {process.log_path})",
        flush=True,
    )
    process.start()
    try:
        app = ServeApp(
            settings,
            EngineClient(process.url, engine_keep_alive_s=settings.engine_keep_alive_s),
            fetch or pull_fetch(settings),
        )
        yield Service(settings, process, app)
    finally:
        process.stop()

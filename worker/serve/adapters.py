"""Adapters named by requests: parsed, pulled once, verified, loaded into the engine, evicted LRU.

A request's `model` names the base model or an adapter:
- a preloaded name (`FTW_SERVE_ADAPTERS`), or an adapter already loaded under that name;
- `s3://bucket/prefix` — the adapter folder (with its manifest.json) in S3;
- `org/repo`, `org/repo@revision` or `hf://…` — a Hub repo holding the adapter;
- a run id — the local store, else `BUCKET_NAME`/`FTW_S3_PREFIX`/<run_id>/adapter;
- a local folder under BASE_VOLUME or FTW_ALLOWED_PATHS (operators, tests).
Unknown adapters are pulled with `worker.publish.pull` (verified against their manifest, cached by
content), checked here (PEFT LoRA, trained on our base, what vLLM refuses: rank above
MAX_LORA_RANK, modules_to_save, DoRA, bias) and loaded into the engine under the request's name.
Concurrent requests for the same new adapter share one pull; a broken adapter fails its own
requests with an AdapterError and nothing else. Engine slots: at most MAX_CPU_LORAS loaded, the
least recently used idle one unloaded first; the disk cache is pruned the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from schemas.job import RUN_ID_PATTERN
from schemas.limits import excerpt
from schemas.paths import allowed_roots
from worker.errors import AdapterError, FtwError
from worker.publish.pull import ArtifactMissing
from worker.serve.settings import ServeSettings

HUB_REF = re.compile(
    r"(?:hf://)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(?:@[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199})?"
)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterRef:
    """Where an adapter comes from: `source` is what worker.publish.pull takes."""

    name: str
    source: str


@dataclass(frozen=True)
class Adapter:
    name: str  # the engine's name for it: one per content digest
    digest: str
    path: Path
    rank: int
    chat_template: str | None


def parse_ref(name: str, settings: ServeSettings) -> AdapterRef:
    """The request's model string → where to pull it from (AdapterError when it names nothing)."""
    preloaded = dict(settings.preload)
    source = preloaded.get(name, name)
    if source.startswith(("s3://", "hf://")) or HUB_REF.fullmatch(source) or RUN_ID_PATTERN.fullmatch(source):
        return AdapterRef(name, source)
    if source.startswith(("/", "file://")):
        if "\0" in source:  # no file name holds one; resolve() would raise on it
            raise AdapterError(
                f"the local folder {excerpt(source)} holds a NUL character",
                status=400,
                hint="name the adapter's folder as it is on disk",
            )
        folder = Path(source.removeprefix("file://")).resolve()
        if any(folder.is_relative_to(root) for root in allowed_roots(settings.env)):
            return AdapterRef(name, str(folder))
        raise AdapterError(
            f"the local folder {folder} is outside BASE_VOLUME and FTW_ALLOWED_PATHS",
            status=403,
            hint="serve adapters from S3 or the Hub, or list the folder in FTW_ALLOWED_PATHS",
        )
    raise AdapterError(
        f"the model {name!r} is neither the base model ({settings.served_name}) nor an adapter name",
        hint="name an adapter as org/repo[@revision] (Hub), s3://bucket/prefix, a run id, or one of the preloaded "
        f"names {sorted(preloaded) or '(none)'}",
        status=404,
        error_code="model_not_found",
    )


def engine_name(digest: str) -> str:
    return "ftw-" + hashlib.sha256(digest.encode()).hexdigest()[:16]


def verify_adapter(path: Path, settings: ServeSettings, name: str, digest: str = "") -> Adapter:
    """Check a pulled folder before the engine sees it: every reason it would fail, said plainly."""
    from worker.publish.vllm_check import check_adapter

    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(
            f"adapter {name!r} has no readable adapter_config.json ({e})",
            hint="publish the adapter folder as PEFT saves it (adapter_config.json + adapter_model.safetensors)",
        ) from e
    # vLLM's own refusals, from the publish stage's check; unknown target names stay a warning there and here
    problems = [
        w
        for w in check_adapter(path, settings.max_lora_rank)
        if not w.startswith(("target modules", "target parameters"))
    ]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        problems.append("adapter_model.safetensors is missing")
    base = str(config.get("base_model_name_or_path") or "").rstrip("/")
    if base and base not in settings.base_names():
        problems.append(
            f"it was trained on {base!r}, but this worker serves {settings.model!r} "
            "(add the name to FTW_SERVE_BASE_ALIASES if they are the same model)"
        )
    if problems:
        raise AdapterError(f"adapter {name!r} cannot be served: " + "; ".join(problems), status=400)
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    digest = digest or str(path.resolve())
    return Adapter(
        name=engine_name(digest), digest=digest, path=path, rank=max(ranks), chat_template=adapter_chat_template(path)
    )


def adapter_chat_template(path: Path) -> str | None:
    """The adapter's own chat template (a tokenizer saved with it), if it has one."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None


def prune_disk_cache(root: Path, max_bytes: int, keep: set[Path]) -> list[Path]:
    """Remove the least recently used cache entries (not in `keep`) until the cache fits `max_bytes`."""
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in entries}
    total, removed = sum(sizes.values()), []
    for entry in sorted(entries, key=lambda p: p.stat().st_mtime):
        if total <= max_bytes:
            break
        if entry.resolve() in keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry)
    return removed


@dataclass(frozen=True)
class Fetched:
    """A pulled adapter folder and its content identity: the manifest's digest (the folder itself for a
    local folder without one), so that every name of the same adapter shares one engine slot."""

    path: Path
    digest: str


Fetch = Callable[[AdapterRef], Awaitable[Fetched]]
Load = Callable[[Adapter], Awaitable[None]]
Unload = Callable[[str], Awaitable[None]]


def unreachable(e: BaseException) -> bool:
    """A network failure reaching the adapter's source: socket errors, the Hub's (httpx), S3's (botocore)."""
    import httpx
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(
        e, (ConnectionError, TimeoutError, socket.gaierror, httpx.TransportError, BotoConnectionError, HTTPClientError)
    )


def pull_failure(name: str, ref: AdapterRef, e: FtwError | Exception) -> AdapterError:
    """What a request is told when its adapter cannot be pulled: 404 when nothing is published under the
    name, 503 with a retry hint when the source could not be reached, else 400 with the pull's reason."""
    if unreachable(e) or unreachable(e.__cause__):
        return AdapterError(
            f"adapter {name!r} could not be pulled: {ref.source} could not be reached "
            f"({type(e).__name__}: {str(e)[:300]})",
            status=503,
            hint="the Hub or the bucket did not answer (network or outage); retry in a minute",
        )
    missing = isinstance(e, ArtifactMissing)
    message, hint = (e.message, e.hint) if isinstance(e, FtwError) else (f"{type(e).__name__}: {e}", "")
    return AdapterError(
        f"the model {name!r} does not exist: {message}"
        if missing
        else f"adapter {name!r} could not be pulled from {ref.source}: {message}",
        hint=hint,
        status=404 if missing else 400,
        error_code="model_not_found" if missing else None,
    )


async def single_flight(pending: dict[str, asyncio.Future], key: str, make: Callable[[], Awaitable]):
    """`make()` once for concurrent callers with the same key; all get its result or its error."""
    if key in pending:
        return await asyncio.shield(pending[key])
    future = asyncio.get_running_loop().create_future()
    pending[key] = future
    try:
        result = await make()
        future.set_result(result)
        return result
    except BaseException as e:
        future.set_exception(e if isinstance(e, Exception) else AdapterError(f"loading {key!r} was cancelled"))
        future.exception()  # retrieved here, so a failure nobody else awaited is not logged as lost
        raise
    finally:
        del pending[key]


class AdapterRegistry:
    """Adapters loaded in the engine, keyed by content digest; request names are aliases of a digest.

    A name is resolved (pulled: verified and cached by content) once, concurrent requests sharing it;
    the digest is loaded once, whatever names lead to it, under the engine name `ftw-<digest>`.
    """

    def __init__(self, settings: ServeSettings, fetch: Fetch, load: Load, unload: Unload):
        self.settings, self._fetch, self._load, self._unload = settings, fetch, load, unload
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()  # digest -> adapter, least recently used first
        self.aliases: dict[str, str] = {}  # request name -> digest of a loaded adapter
        self._resolving: dict[str, asyncio.Future] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._in_use: Counter[str] = Counter()
        self.pulls = 0  # completed pulls (tests check that concurrent requests share one)
        self.loads = 0  # adapters loaded into the engine

    def names(self) -> list[str]:
        """The names clients used for the loaded adapters."""
        return [n for n, digest in self.aliases.items() if digest in self.loaded]

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Adapter]:
        """The adapter, loaded and kept from eviction while the request runs."""
        adapter = await self.get(name)
        self._in_use[adapter.digest] += 1
        try:
            yield adapter
        finally:
            self._in_use[adapter.digest] -= 1

    async def get(self, name: str) -> Adapter:
        digest = self.aliases.get(name)
        if digest in self.loaded:
            self.loaded.move_to_end(digest)
            return self.loaded[digest]
        return await single_flight(self._resolving, name, lambda: self._bring(name))

    async def _bring(self, name: str) -> Adapter:
        ref = parse_ref(name, self.settings)
        try:
            fetched = await self._fetch(ref)
        except AdapterError:
            raise
        except (
            Exception
        ) as e:  # network errors of the Hub (httpx) and S3 (botocore) arrive bare or wrapped in a PublishError
            if not (isinstance(e, FtwError) or unreachable(e)):
                raise
            raise pull_failure(name, ref, e) from e
        self.pulls += 1
        adapter = await single_flight(self._loading, fetched.digest, lambda: self._load_digest(fetched, name))
        self.aliases[name] = adapter.digest
        return adapter

    async def _load_digest(self, fetched: Fetched, name: str) -> Adapter:
        if fetched.digest in self.loaded:  # another name of the same content is loaded already
            self.loaded.move_to_end(fetched.digest)
            return self.loaded[fetched.digest]
        await asyncio.to_thread(self._keep_disk_cache_small, fetched.path)
        adapter = verify_adapter(fetched.path, self.settings, name, fetched.digest)
        await self._make_room()
        try:
            await self._load(adapter)
        except FtwError as e:
            raise AdapterError(
                f"adapter {name!r} was pulled but the engine could not load it: {e.message}",
                hint="the adapter's files are damaged or do not fit the base model",
            ) from e
        self.loads += 1
        self.loaded[fetched.digest] = adapter
        return adapter

    def _keep_disk_cache_small(self, pulled: Path) -> None:
        from worker.publish.pull import cache_root

        root = cache_root(self.settings.env)
        if pulled.parent.resolve() != root.resolve():
            return  # a local folder served in place: not ours to prune
        os.utime(pulled)  # most recently used
        keep = {a.path.resolve() for a in self.loaded.values()} | {pulled.resolve()}
        prune_disk_cache(root, self.settings.cache_bytes, keep)

    async def _make_room(self) -> None:
        while len(self.loaded) >= self.settings.max_cpu_loras:
            idle = next((d for d in self.loaded if not self._in_use[d]), None)
            if idle is None:
                raise AdapterError(
                    f"all {len(self.loaded)} adapter slots are busy",
                    hint="retry shortly or raise MAX_CPU_LORAS",
                    status=429,
                )
            evicted = self.loaded.pop(idle)
            self.aliases = {n: d for n, d in self.aliases.items() if d != idle}
            await self._unload(evicted.name)

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
import json
import os
import re
import shutil
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from schemas.paths import allowed_roots
from worker.errors import AdapterError, FtwError
from worker.serve.settings import ServeSettings

HUB_REF = re.compile(r"(?:hf://)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(?:@[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199})?")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterRef:
    """Where an adapter comes from: `source` is what worker.publish.pull takes."""

    name: str
    source: str


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    rank: int
    chat_template: Optional[str]


def parse_ref(name: str, settings: ServeSettings) -> AdapterRef:
    """The request's model string → where to pull it from (AdapterError when it names nothing)."""
    preloaded = dict(settings.preload)
    source = preloaded.get(name, name)
    if source.startswith(("s3://", "hf://")) or HUB_REF.fullmatch(source) or RUN_ID.fullmatch(source):
        return AdapterRef(name, source)
    if source.startswith(("/", "file://")):
        folder = Path(source.removeprefix("file://")).resolve()
        if any(folder.is_relative_to(root) for root in allowed_roots(settings.env)):
            return AdapterRef(name, str(folder))
        raise AdapterError(f"the local folder {folder} is outside BASE_VOLUME and FTW_ALLOWED_PATHS", status=403,
                           hint="serve adapters from S3 or the Hub, or list the folder in FTW_ALLOWED_PATHS")
    raise AdapterError(
        f"the model {name!r} is neither the base model ({settings.served_name}) nor an adapter name",
        hint="name an adapter as org/repo[@revision] (Hub), s3://bucket/prefix, a run id, or one of the preloaded "
             f"names {sorted(preloaded) or '(none)'}",
        status=404,
    )


def verify_adapter(path: Path, settings: ServeSettings, name: str) -> Adapter:
    """Check a pulled folder before the engine sees it: every reason it would fail, said plainly."""
    from worker.publish.vllm_check import check_adapter

    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r} has no readable adapter_config.json ({e})",
                           hint="publish the adapter folder as PEFT saves it (adapter_config.json + adapter_model.safetensors)") from e
    # vLLM's own refusals, from the publish stage's check; unknown target names stay a warning there and here
    problems = [w for w in check_adapter(path, {"FTW_MAX_LORA_RANK": str(settings.max_lora_rank)})
                if not w.startswith(("target modules", "target parameters"))]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        problems.append("adapter_model.safetensors is missing")
    base = str(config.get("base_model_name_or_path") or "").rstrip("/")
    if base and base not in settings.base_names():
        problems.append(f"it was trained on {base!r}, but this worker serves {settings.model!r} "
                        "(add the name to FTW_SERVE_BASE_ALIASES if they are the same model)")
    if problems:
        raise AdapterError(f"adapter {name!r} cannot be served: " + "; ".join(problems), status=400)
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    return Adapter(name=name, path=path, rank=max(ranks), chat_template=adapter_chat_template(path))


def adapter_chat_template(path: Path) -> Optional[str]:
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


Fetch = Callable[[AdapterRef], Awaitable[Path]]
Load = Callable[[Adapter], Awaitable[None]]
Unload = Callable[[str], Awaitable[None]]


class AdapterRegistry:
    """Adapters loaded in the engine, keyed by request name; single-flight loading; LRU slots."""

    def __init__(self, settings: ServeSettings, fetch: Fetch, load: Load, unload: Unload):
        self.settings, self._fetch, self._load, self._unload = settings, fetch, load, unload
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self._in_use: Counter[str] = Counter()
        self.pulls = 0  # completed pulls (tests check that concurrent requests share one)

    def names(self) -> list[str]:
        return list(self.loaded)

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Adapter]:
        """The adapter, loaded and kept from eviction while the request runs."""
        adapter = await self.get(name)
        self._in_use[name] += 1
        try:
            yield adapter
        finally:
            self._in_use[name] -= 1

    async def get(self, name: str) -> Adapter:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        if name in self._pending:
            return await asyncio.shield(self._pending[name])
        future = asyncio.get_running_loop().create_future()
        self._pending[name] = future
        try:
            adapter = await self._bring(name)
            future.set_result(adapter)
            return adapter
        except BaseException as e:
            future.set_exception(e if isinstance(e, Exception) else AdapterError(f"loading adapter {name!r} was cancelled"))
            future.exception()  # retrieved here, so a failure nobody else awaited is not logged as lost
            raise
        finally:
            del self._pending[name]

    async def _bring(self, name: str) -> Adapter:
        ref = parse_ref(name, self.settings)
        try:
            path = await self._fetch(ref)
        except FtwError as e:
            raise AdapterError(f"adapter {name!r} could not be pulled from {ref.source}: {e.message}", hint=e.hint) from e
        self.pulls += 1
        await asyncio.to_thread(self._keep_disk_cache_small, path)
        adapter = verify_adapter(path, self.settings, name)
        await self._make_room()
        try:
            await self._load(adapter)
        except FtwError as e:
            raise AdapterError(f"adapter {name!r} was pulled but the engine could not load it: {e.message}",
                               hint="the adapter's files are damaged or do not fit the base model") from e
        self.loaded[name] = adapter
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
            idle = next((n for n in self.loaded if not self._in_use[n]), None)
            if idle is None:
                raise AdapterError(f"all {len(self.loaded)} adapter slots are busy", hint="retry shortly or raise MAX_CPU_LORAS",
                                   status=429)
            del self.loaded[idle]
            await self._unload(idle)

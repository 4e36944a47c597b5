"""Adapter handling of the serving worker, no engine started: the names a request may give an adapter and
the source each maps to, the checks an adapter must pass to be served (with every reason it fails), its own
chat template, the disk cache's least-recently-used pruning, and the registry's own logic (single flight, LRU
slots, one slot per content, failures), with fetch/load/unload injected to record their calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve.test_requests import settings
from worker.errors import AdapterError
from worker.serve.adapters import parse_ref, prune_disk_cache, verify_adapter


# ---- adapter names
def test_adapter_names_map_to_pull_sources(tmp_path):
    s = settings(FTW_SERVE_ADAPTERS="support=s3://b/runs/r1/adapter", BASE_VOLUME=str(tmp_path))
    assert parse_ref("support", s).source == "s3://b/runs/r1/adapter"
    assert parse_ref("org/ad@abc123", s).source == "org/ad@abc123"
    assert parse_ref("run-42", s).source == "run-42"
    assert parse_ref(f"file://{tmp_path}/ad", s).source == str(tmp_path / "ad")
    with pytest.raises(AdapterError) as e:
        parse_ref("/etc/ssl", s)
    assert e.value.status == 403
    with pytest.raises(AdapterError) as e:
        parse_ref("what is this?", s)
    assert e.value.status == 404 and "support" in e.value.hint


def write_adapter(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 8, "base_model_name_or_path": "org/base", "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    return folder


def test_verify_adapter_names_every_reason_it_cannot_be_served(tmp_path):
    s = settings(MAX_LORA_RANK="16", FTW_SERVE_BASE_ALIASES="meta/base-v1")
    ok = verify_adapter(write_adapter(tmp_path / "ok", r=16), s, "ok")
    assert ok.rank == 16 and ok.chat_template is None
    assert (
        verify_adapter(write_adapter(tmp_path / "alias", base_model_name_or_path="meta/base-v1"), s, "alias").rank == 8
    )
    bad = write_adapter(
        tmp_path / "bad", r=64, base_model_name_or_path="other/model", modules_to_save=["lm_head"], use_dora=True
    )
    with pytest.raises(AdapterError) as e:
        verify_adapter(bad, s, "bad")
    for needle in ("rank 64", "other/model", "modules_to_save", "DoRA"):
        assert needle in e.value.message
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        verify_adapter(tmp_path / "empty", s, "empty")


def test_adapter_chat_template_comes_from_its_tokenizer(tmp_path):
    folder = write_adapter(tmp_path / "t")
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert verify_adapter(folder, settings(), "t").chat_template == "{{ messages[0]['content'] }}"


def test_disk_cache_prunes_least_recently_used_first(tmp_path):
    import os

    entries = []
    for i in range(4):
        entry = tmp_path / f"sha{i}"
        entry.mkdir()
        (entry / "w").write_bytes(b"0" * 1000)
        os.utime(entry, (1000 + i, 1000 + i))
        entries.append(entry)
    removed = prune_disk_cache(tmp_path, 2500, keep={entries[0].resolve()})
    assert removed == [entries[1], entries[2]]
    assert entries[0].exists() and entries[3].exists()


# ---- the adapter registry's own logic (fetch/load/unload are injected: here they record calls)
def test_registry_single_flight_lru_slots_one_slot_per_content_and_failures(tmp_path):
    import asyncio
    import hashlib
    import shutil
    from dataclasses import replace

    from worker.serve.adapters import AdapterRegistry, Fetched

    s = replace(settings(BASE_VOLUME=str(tmp_path)), max_cpu_loras=2)
    for rank, name in enumerate(("a", "b", "c"), start=4):
        write_adapter(tmp_path / name, r=rank)
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")  # the same content under another name
    calls: list[tuple[str, str]] = []

    async def fetch(ref):
        calls.append(("fetch", ref.name))
        await asyncio.sleep(0.05)
        if ref.name.endswith("/missing"):
            raise AdapterError("no such folder")
        folder = Path(ref.source)
        return Fetched(folder, hashlib.sha256((folder / "adapter_config.json").read_bytes()).hexdigest())

    async def load(adapter):
        calls.append(("load", adapter.name))

    async def unload(name):
        calls.append(("unload", name))

    registry = AdapterRegistry(s, fetch, load, unload)
    ref = lambda n: f"file://{tmp_path}/{n}"  # noqa: E731

    async def scenario():
        a = (await asyncio.gather(*(registry.get(ref("a")) for _ in range(5))))[0]
        assert calls == [("fetch", ref("a")), ("load", a.name)]
        same = await asyncio.gather(registry.get(ref("a-copy")), registry.get(str(tmp_path / "a")))
        assert {x.name for x in same} == {a.name} and registry.loads == 1 and len(registry.loaded) == 1
        assert set(registry.names()) == {ref("a"), ref("a-copy"), str(tmp_path / "a")}
        results = await asyncio.gather(*(registry.get(ref("missing")) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, AdapterError) and "no such folder" in r.message for r in results)
        assert calls.count(("fetch", ref("missing"))) == 1
        b = await registry.get(ref("b"))
        async with registry.use(ref("a-copy")):  # a busy, b idle: c takes b's slot
            c = await registry.get(ref("c"))
            assert ("unload", b.name) in calls and list(registry.loaded.values()) == [a, c]
            async with registry.use(ref("c")):
                with pytest.raises(AdapterError) as busy:
                    await registry.get(ref("b"))
                assert busy.value.status == 429

    asyncio.run(scenario())

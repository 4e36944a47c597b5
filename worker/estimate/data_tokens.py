"""How many tokens a config's training data holds, without tokenising it.

1. The prepared-data cache, when a complete one matches (same sources by content id, same
   sequence_len, micro_batch_size and packing): its manifest's exact token and row counts. Local
   sources over HASH_LIMIT_BYTES are not hashed for this (the checks must stay seconds long).
2. Otherwise, for local JSON/JSONL files, the characters of every string in a sample of rows
   (the first SAMPLE_BYTES of each file), scaled by the file's size: tokens ≈ characters /
   CHARS_PER_TOKEN + TEMPLATE_TOKENS per message (role markers of a chat template). Other local
   formats count bytes / BYTES_PER_TOKEN. English BPE tokenisers (Llama 3, Qwen, Mistral) give
   3.5-4.5 characters a token; docs/estimate.md has the check against real caches.
3. Hub, s3:// and http(s) datasets are not read: their size is unknown (the estimate then asks for
   max_steps or --tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from schemas.paths import is_local, resolve_local_path
from worker.data.cache import cache_root, read_manifest
from worker.data.sources import data_files_of, is_saved_dataset, resolve_local
from worker.errors import DataError

SAMPLE_BYTES = 8 << 20
CHARS_PER_TOKEN = 3.8
TEMPLATE_TOKENS = 5
BYTES_PER_TOKEN = 4.5
HASH_LIMIT_BYTES = 1 << 30


@dataclass
class DatasetSize:
    """Training tokens (before packing) and samples; None when they cannot be known here."""

    tokens: int | None = None
    samples: int | None = None
    source: str = "unknown"
    notes: list[str] = field(default_factory=list)
    trained_share: float | None = None  # tokens with a label / all (a prepared cache's count); None: unknown

    @property
    def mean_sample_tokens(self) -> float | None:
        return self.tokens / self.samples if self.tokens and self.samples else None


def dataset_size(cfg: TrainingConfig, env: Mapping[str, str]) -> DatasetSize:
    entries = [*(cfg.datasets or []), *(cfg.pretraining_dataset or [])]
    cached = from_cache(cfg, env, entries)
    if cached is not None:
        return cached
    size = DatasetSize(0, 0, f"estimated from the local files: characters / {CHARS_PER_TOKEN}, not tokenised")
    for entry in entries:
        if not is_local(entry.path):
            size.notes.append(f"dataset {entry.path}: not local, its size is unknown before download")
            return DatasetSize(None, None, "unknown", size.notes)
        try:
            tokens, samples = estimate_local(resolve_local_path(entry.path, env), entry)
        except (DataError, OSError) as e:
            size.notes.append(f"dataset {entry.path}: cannot be read here ({e})")
            return DatasetSize(None, None, "unknown", size.notes)
        size.tokens += tokens  # type: ignore[operator]
        size.samples += samples  # type: ignore[operator]
    if cfg.val_set_size:
        share = cfg.val_set_size if cfg.val_set_size < 1 else cfg.val_set_size / max(size.samples or 1, 1)
        size.tokens, size.samples = int(size.tokens * (1 - share)), int(size.samples * (1 - share))  # type: ignore[operator]
    return size


def from_cache(cfg: TrainingConfig, env: Mapping[str, str], entries: list[Any]) -> DatasetSize | None:
    """The newest complete cache built from these sources with this layout, if any."""
    try:
        wanted = [source_id(e, env) for e in entries]
    except (DataError, OSError):
        return None
    root = cache_root(cfg, dict(env))
    if not root.is_dir():
        return None
    candidates = []
    for folder in root.iterdir():
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None or manifest.get("sequence_len") != cfg.sequence_len:
            continue
        if (
            manifest.get("micro_batch_size") != cfg.batch_shape()[0]
            or bool((manifest.get("packing") or {}).get("enabled")) != cfg.sample_packing
        ):
            continue
        ids = [s.get("content_id", "") for s in manifest.get("sources") or []][: len(wanted)]
        if len(ids) == len(wanted) and all(
            i == w or (w.endswith("@") and i.startswith(w)) for i, w in zip(ids, wanted)
        ):
            candidates.append((folder.stat().st_mtime, folder, manifest))
    if not candidates:
        return None
    _, folder, manifest = max(candidates, key=lambda c: c[0])
    return DatasetSize(
        int(manifest["tokens"]["train"]),
        int(manifest["rows"]["train"]),
        f"counted in the prepared cache {folder}",
        trained_share=manifest["tokens"].get("trained_share"),
    )


def source_id(entry: Any, env: Mapping[str, str]) -> str:
    """The content id the cache's manifest records for a source (a Hub dataset: any revision)."""
    if is_local(entry.path):
        path = resolve_local_path(entry.path, env)
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if size > HASH_LIMIT_BYTES:
            raise DataError(f"{entry.path}: too large to hash for an estimate", hint="")
        return resolve_local(path, entry, entry.path).content_id
    if entry.path.startswith(("s3://", "http://", "https://")):
        raise DataError(f"{entry.path}: remote file", hint="")
    return f"hub:{entry.path}@"


def estimate_local(path: Path, entry: Any) -> tuple[int, int]:
    """(tokens, samples) of a local file or folder, from a sample of its rows."""
    if path.is_file():
        files = [path]
    elif is_saved_dataset(path):
        files = sorted(path.rglob("*.arrow"))
    else:
        files = data_files_of(path, entry, entry.path)
    tokens = samples = 0
    for f in files:
        t, s = estimate_file(f)
        tokens, samples = tokens + t, samples + s
    return tokens, samples


def estimate_file(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    if path.suffix not in (".json", ".jsonl") or not size:
        return int(size / BYTES_PER_TOKEN), max(1, size // 2048)
    chars = messages = rows = 0
    read = 0
    for row, nbytes in sample_rows(path):
        c, m = text_of(row)
        chars, messages, rows, read = chars + c, messages + m, rows + 1, read + nbytes
    if not rows:
        return 0, 0
    scale = size / max(read, 1)
    return int((chars / CHARS_PER_TOKEN + messages * TEMPLATE_TOKENS) * scale), int(rows * scale)


def sample_rows(path: Path) -> Iterator[tuple[Any, float]]:
    """(row, bytes) of the first SAMPLE_BYTES of a JSON Lines file, or of a JSON array."""
    with open(path, "rb") as stream:
        head = stream.read(SAMPLE_BYTES)
    text = head.decode("utf-8", errors="ignore")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError):  # an array longer than the sample: count its bytes instead
            yield {"text": text}, len(head)
            return
        rows = rows if isinstance(rows, list) else [rows]
        for row in rows:  # the whole array was read: its bytes, shared out
            yield row, len(head) / max(len(rows), 1)
        return
    lines = text.splitlines(keepends=True)
    if len(head) == SAMPLE_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut
    for line in lines:
        if line.strip():
            try:
                yield json.loads(line), len(line.encode())
            except (ValueError, RecursionError):  # not a JSON line (preprocessing says which): not counted
                continue


def text_of(value: Any) -> tuple[int, int]:
    """(characters of every string, number of chat messages) in a row."""
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, dict):
        chars = messages = 0
        for v in value.values():
            c, m = text_of(v)
            chars, messages = chars + c, messages + m
        return chars, messages + (1 if "content" in value or "value" in value else 0)
    if isinstance(value, list):
        chars = messages = 0
        for v in value:
            c, m = text_of(v)
            chars, messages = chars + c, messages + m
        return chars, messages
    return 0, 0

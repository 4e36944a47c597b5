"""The prepared-data cache: BASE_VOLUME/cache/<fingerprint>/ (or dataset_prepared_path/<fingerprint>/).

The fingerprint covers everything that changes the tokens: the config keys below, the
tokenizer's content (its serialised vocabulary, merges, added tokens, normaliser and template),
each source's content id (sha256 of the file bytes, or the Hub revision sha), and this package's
own code and library versions. A cache is built under `.tmp-<fingerprint>-<pid>`, its
manifest.json (complete: true) written last, then renamed into place: a folder under the
fingerprint name is complete or absent. One build per fingerprint at a time (`<fingerprint>.lock`,
an flock the kernel releases when its holder dies, even by kill -9); a process that waited finds
the finished cache and uses it. Stale temporary folders of a dead builder are removed by the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from schemas.paths import base_volume
from worker.errors import DataError
from worker.lifeline import pid_alive

# TrainingConfig keys that change the prepared tokens (the tokenizer's own content is hashed apart)
TOKEN_KEYS = (
    "datasets",
    "test_datasets",
    "pretraining_dataset",
    "shuffle_merged_datasets",
    "dataset_exact_deduplication",
    "val_set_size",
    "seed",
    "chat_template",
    "chat_template_jinja",
    "default_system_message",
    "eot_tokens",
    "train_on_inputs",
    "sequence_len",
    "excess_length_strategy",
    "min_sample_len",
    "sample_packing",
    "eval_sample_packing",
    "sample_packing_bin_size",
    "sample_packing_group_size",
    "special_tokens",
    "tokens",
    "tokenizer_use_fast",
    "tokenizer_legacy",
)
LIBRARIES = ("datasets", "tokenizers", "transformers", "pyarrow")
MANIFEST = "manifest.json"
SCRATCH_STALE_S = 24 * 3600  # another host's scratch folder untouched this long belongs to a dead worker


def cache_root(cfg: TrainingConfig, env: dict[str, str] | None = None) -> Path:
    """dataset_prepared_path (relative paths are under BASE_VOLUME, never the working directory)."""
    env = dict(os.environ) if env is None else env
    volume = base_volume(env)
    if cfg.dataset_prepared_path:
        given = Path(cfg.dataset_prepared_path.removeprefix("file://")).expanduser()
        return given if given.is_absolute() else volume / given
    return volume / "cache"


def code_digest() -> str:
    h = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"python": sys.version.split()[0], **{name: version(name) for name in LIBRARIES}}


def fingerprint(cfg: TrainingConfig, tokenizer_digest: str, content_ids: list[str]) -> str:
    packing = cfg.sample_packing or cfg.eval_sample_packing
    subset = {
        "config": cfg.model_dump(mode="json", include=set(TOKEN_KEYS)),
        "pack_capacity": cfg.batch_shape()[0] * cfg.sequence_len if packing else None,
        # rl rows: micro_batch_size pairs per packed row, grpo prompts sized for the completion length
        "rl_layout": [cfg.rl, cfg.batch_shape()[0], cfg.trl.max_completion_length if cfg.trl else None]
        if cfg.rl
        else None,
        "tokenizer": tokenizer_digest,
        "data": content_ids,
        "code": code_digest(),
        "versions": versions(),
    }
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache folder; None for anything else."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") is True else None


@contextmanager
def build_lock(root: Path, fp: str, waiting: Callable[[float], None]) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / f"{fp}.lock"))
    started = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=5)
            break
        except Timeout:
            waiting(time.monotonic() - started)
    try:
        yield
    finally:
        lock.release()


def scratch_dir(root: Path) -> Path:
    """A work folder for downloads and datasets' files, named by host and pid. Those of dead
    processes of this host are removed. Another host's pids mean nothing here (a network volume
    that several workers share), so its folders go only once untouched for SCRATCH_STALE_S: a
    serverless worker that was killed never comes back under its name to clean up."""
    host = socket.gethostname().replace("-", "_")
    now = time.time()
    for old in root.glob(".scratch-*"):
        if old.name.startswith(f".scratch-{host}-"):
            pid = old.name.removeprefix(f".scratch-{host}-").split("-")[0]
            stale = pid.isdigit() and not pid_alive(int(pid))
        else:
            stale = now - _mtime(old) > SCRATCH_STALE_S
        if stale:
            shutil.rmtree(old, ignore_errors=True)
    path = root / f".scratch-{host}-{os.getpid()}-{os.urandom(4).hex()}"
    path.mkdir(parents=True)
    return path


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def fresh_build_dir(root: Path, fp: str) -> Path:
    """An empty temporary folder for this build; leftovers of dead builders removed (we hold the lock)."""
    for stale in root.glob(f".tmp-{fp}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / fp
    if final.exists() and read_manifest(final) is None:
        shutil.rmtree(final)  # a folder without a complete manifest is never trusted
    tmp = root / f".tmp-{fp}-{os.getpid()}"
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Manifest last, fsynced, then one rename: the cache appears complete or not at all."""
    path = tmp / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**manifest, "complete": True}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)


def get_or_build(
    root: Path, fp: str, build: Callable[[Path], dict[str, Any]], waiting: Callable[[float], None]
) -> tuple[dict[str, Any], bool]:
    """(manifest, built): the complete cache under `fp`, or one built now by `build(tmp_folder)`.

    Checked again after taking the lock: a process that waited uses what the other one built."""
    final = root / fp
    manifest = read_manifest(final)
    if manifest is not None:
        return manifest, False
    with build_lock(root, fp, waiting):
        manifest = read_manifest(final)
        if manifest is not None:
            return manifest, False
        tmp = fresh_build_dir(root, fp)
        publish(tmp, final, {"fingerprint": fp, **build(tmp), "versions": versions()})
    return json.loads((final / MANIFEST).read_text()), True


@dataclass(frozen=True)
class PreparedData:
    train: Any  # datasets.Dataset: input_ids, labels, position_ids (int32 lists)
    eval: Any | None
    manifest: dict[str, Any]

    @property
    def packed(self) -> bool:
        return bool(self.manifest["packing"]["enabled"])


def load_prepared(cache_dir: str | Path) -> PreparedData:
    """The cache as docs/contracts.md defines it; refused unless its manifest says complete."""
    from datasets import load_from_disk

    folder = Path(cache_dir)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(
            f"{folder} is not a complete prepared-data cache (no manifest with complete: true)",
            hint="run `ftw preprocess CONFIG` again",
        )
    evaluation = load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return PreparedData(load_from_disk(str(folder / "train")), evaluation, manifest)

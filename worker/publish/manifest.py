"""The sha256 manifest that marks a published folder complete, and its verification.

A published prefix (S3 key prefix, local store folder, Hub repo) is complete only when its
`manifest.json` exists; every publisher writes it last, and every reader trusts nothing without
it. The manifest lists each file's relative path, size and sha256:

    {"format": "ftw-manifest/1", "files": {"adapter_model.safetensors": {"size": 123, "sha256": "…"}, …}}

`manifest_sha256` (the sha256 of its canonical bytes) is the content address of the whole
artifact: the pull cache is keyed by it and results report it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import PublishError

MANIFEST_NAME = "manifest.json"
FORMAT = "ftw-manifest/1"
CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, sorted, without the manifest itself, temp or hidden lock files."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (
            path.is_file()
            and not path.is_symlink()
            and rel.as_posix() != MANIFEST_NAME
            and not rel.name.startswith((".tmp-", ".lock"))
        ):
            out.append(path)
    return out


@dataclass(frozen=True)
class Manifest:
    files: dict[str, dict[str, Any]]  # relative posix path -> {"size", "sha256"}

    @classmethod
    def of_folder(cls, folder: Path) -> Manifest:
        files = {}
        for path in folder_files(folder):
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        return cls(files)

    @staticmethod
    def bytes_sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
        except ValueError as e:
            raise ValueError(f"manifest.json is not valid JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("files"), dict):
            raise ValueError(f"manifest.json is not an {FORMAT} manifest")
        for rel, entry in raw["files"].items():
            if not safe_relative(rel) or not isinstance(entry, dict) or not {"size", "sha256"} <= set(entry):
                raise ValueError(f"manifest.json has a bad entry {rel!r}")
        return cls(raw["files"])

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "files": self.files}, sort_keys=True, indent=1).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(int(e["size"]) for e in self.files.values())

    def problems(self, folder: Path) -> list[str]:
        """What differs between `folder` and this manifest (missing, wrong size, wrong sha256); [] when it matches."""
        out = []
        for rel, entry in self.files.items():
            path = folder / rel
            if not path.is_file():
                out.append(f"{rel}: missing")
            elif path.stat().st_size != entry["size"]:
                out.append(f"{rel}: size {path.stat().st_size} != {entry['size']}")
            elif sha256_file(path) != entry["sha256"]:
                out.append(f"{rel}: sha256 mismatch")
        return out

    def verify(self, folder: Path, what: str, hint: str) -> None:
        """PublishError `what: <the first five problems>` with `hint` where `folder` does not match."""
        problems = self.problems(folder)
        if problems:
            raise PublishError(f"{what}: {'; '.join(problems[:5])}", hint)

    def write(self, folder: Path) -> Path:
        """Write manifest.json into `folder` (through a temp name: readers never see half of it)."""
        tmp = folder / f".tmp-{MANIFEST_NAME}"
        tmp.write_bytes(self.to_bytes())
        tmp.replace(folder / MANIFEST_NAME)
        return folder / MANIFEST_NAME


def safe_relative(rel: str) -> bool:
    """A manifest path may not escape the folder it describes (no absolute path, no '..')."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_NAME
    return Manifest.from_bytes(path.read_bytes()) if path.is_file() else None

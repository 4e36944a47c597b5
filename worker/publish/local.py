"""The local store: `BASE_VOLUME/store/<run_id>/<kind>/`, the default target when no S3/Hub is given.

An artifact is copied into a temp folder beside its place, verified against its manifest, given
its manifest.json, and renamed into place in one step; an older version at the same place is
swapped out and removed after. A reader never sees a half-copied folder. A run's folder in the
store (`store_run_dir`) is refused when a symlink would lead it out of the store, as the run
folder is: ftw neither writes nor reads outside BASE_VOLUME through a planted link.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from schemas.paths import base_volume
from worker.errors import InfraError, PublishError
from worker.publish.manifest import Manifest, folder_files


def store_root(env: Mapping[str, str]) -> Path:
    return base_volume(env) / "store"


def store_run_dir(env: Mapping[str, str], run_id: str) -> Path:
    """BASE_VOLUME/store/<run_id>; an InfraError when the store or the run's folder is a symlink."""
    return checked_store_dir(store_root(env) / run_id)


def checked_store_dir(path: Path) -> Path:
    """A run's folder in the store, `path`, when neither it nor the store is a symlink; else an InfraError."""
    for link in (path.parent, path):
        if link.is_symlink():
            raise InfraError(
                f"{link} is a symlink to {link.resolve()}",
                "ftw only writes and reads the local store inside BASE_VOLUME; replace the link with a folder",
                details={"base_volume": str(path.parent.parent)},
            )
    return path


def store_uri(path: Path) -> str:
    return f"file://{path}"


def publish_local(folder: Path, dest: Path) -> Manifest:
    """Copy `folder` to `dest` atomically, manifest.json inside; returns the manifest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = Manifest.of_folder(folder)
        for src in folder_files(folder):
            target = tmp / src.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        manifest.verify(
            tmp,
            f"copy of {folder.name} to the local store does not match its source",
            "a file changed while it was being published, or the volume is failing",
        )
        manifest.write(tmp)
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    except OSError as e:
        raise PublishError(
            f"cannot write the local store at {dest.parent}: {e.strerror or e}",
            "free space on the volume (BASE_VOLUME) or check its permissions",
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

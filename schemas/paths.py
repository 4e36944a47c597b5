"""Which local paths a job may name: under BASE_VOLUME and FTW_ALLOWED_PATHS, nowhere else.

A string is *local* when it is absolute, starts with `.`/`~`, or is a `file://` URI. Anything
else that looks like `org/name` is a Hub id, and `s3://`, `http(s)://` are remote URIs.
Resolution follows symlinks, so a link planted inside an allowed root cannot point out of it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_BASE_VOLUME = "./volume"
REMOTE_SCHEMES = ("s3://", "http://", "https://", "hf://", "gs://")


def base_volume(env: Mapping[str, str]) -> Path:
    return Path(env.get("BASE_VOLUME") or DEFAULT_BASE_VOLUME).expanduser().resolve()


def allowed_roots(env: Mapping[str, str]) -> list[Path]:
    roots = [base_volume(env)]
    for item in (env.get("FTW_ALLOWED_PATHS") or "").split(os.pathsep):
        if item.strip():
            roots.append(Path(item.strip()).expanduser().resolve())
    return roots


def is_remote(value: str) -> bool:
    return value.startswith(REMOTE_SCHEMES)


def is_local(value: str) -> bool:
    return value.startswith(("/", ".", "~", "file://")) or value.startswith("\\")


def local_path(value: str) -> Path:
    return Path(value.removeprefix("file://")).expanduser()


def check_local_path(value: str, env: Mapping[str, str]) -> str | None:
    """None when `value` is not local or resolves inside an allowed root; else what to change."""
    if "\x00" in value:
        return "path contains a NUL byte"
    if not is_local(value):
        return None
    try:
        resolved = local_path(value).resolve()
    except (OSError, RuntimeError) as e:
        return f"path {value!r} cannot be resolved ({e.__class__.__name__})"
    roots = allowed_roots(env)
    if any(resolved == r or r in resolved.parents for r in roots):
        return None
    return (
        f"local path {value!r} is outside the allowed folders ({', '.join(str(r) for r in roots)}); "
        "put the file under BASE_VOLUME or ask the endpoint operator to add its folder to FTW_ALLOWED_PATHS"
    )

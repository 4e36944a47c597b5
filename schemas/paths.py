"""Which local paths a job may name: under BASE_VOLUME and FTW_ALLOWED_PATHS, nowhere else.

A string is *local* when it is absolute, starts with `.`/`~`/`\\`, or is a `file://` URI;
`s3://`, `http(s)://`, `hf://`, `gs://` are remote; anything else (`org/name`) is a Hub id.
A relative local path (`./data.jsonl`) is read relative to BASE_VOLUME, never to the worker's
current directory: readers resolve it with `resolve_local_path`, the same function the check
uses. Resolution follows symlinks, so a link planted inside an allowed root cannot point out
of it. A `..` segment is refused in every non-remote value, local or not, since a Hub id or a
`data_files` name is later joined onto a folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from schemas.limits import excerpt

DEFAULT_BASE_VOLUME = "./volume"
REMOTE_SCHEMES = ("s3://", "http://", "https://", "hf://", "gs://")
FILE_SCHEME = "file://"


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
    return value.startswith(("/", ".", "~", "\\", FILE_SCHEME))


def resolve_local_path(value: str, env: Mapping[str, str]) -> Path:
    """The absolute, symlink-free path a local value names (relative ones under BASE_VOLUME)."""
    path = Path(value.removeprefix(FILE_SCHEME)).expanduser()
    if not path.is_absolute():
        path = base_volume(env) / path
    return path.resolve()


def local_path(value: str) -> Path:
    """`resolve_local_path` under this process's environment (stage children inherit BASE_VOLUME)."""
    return resolve_local_path(value, os.environ)


def check_local_path(value: str, env: Mapping[str, str]) -> str | None:
    """None when `value` is not local or resolves inside an allowed root; else what to change."""
    if "\x00" in value:
        return "path contains a NUL byte"
    if is_remote(value):
        return None
    if ".." in re.split(r"[/\\]", value):
        return f"path {excerpt(value)} contains a '..' segment; name the file or folder directly"
    if not is_local(value):
        return None
    if value.startswith(FILE_SCHEME) and not value.startswith(FILE_SCHEME + "/"):
        return f"file URI {excerpt(value)} names a host; use file:///absolute/path"
    if value.startswith(FILE_SCHEME) and "%" in value:
        return f"file URI {excerpt(value)} has %-escapes; write the path as it is"
    try:
        resolved = resolve_local_path(value, env)
    except (OSError, RuntimeError, ValueError) as e:
        return f"path {excerpt(value)} cannot be resolved ({e.__class__.__name__})"
    roots = allowed_roots(env)
    if any(resolved == r or r in resolved.parents for r in roots):
        return None
    return (
        f"local path {excerpt(value)} is outside the allowed folders ({', '.join(str(r) for r in roots)}); "
        "put the file under BASE_VOLUME or ask the endpoint operator to add its folder to FTW_ALLOWED_PATHS"
    )


MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def find_module_file(module: str, env: Mapping[str, str]) -> Path | None:
    """The file of a dotted Python module (`pkg.rewards` → pkg/rewards.py, or pkg/rewards/__init__.py) in the
    first allowed root that holds it, symlinks resolved and still inside that root; None where none does."""
    if not MODULE_NAME.fullmatch(module):
        return None
    parts = module.split(".")
    for root in allowed_roots(env):
        for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            resolved = candidate.resolve()
            if resolved.is_file() and root in resolved.parents:
                return resolved
    return None

"""Where rows come from: local files and folders, `save_to_disk` folders, the Hub, s3://, http(s)://.

`resolve(entry, downloads)` finds the data and its content id for the cache fingerprint: the
sha256 of every file's bytes (remote files are downloaded first), or the Hub's revision sha.
`load(resolved, entry, scratch)` reads it as a `datasets.Dataset`; a file that cannot be parsed
is a DataError naming the file and line. datasets' own cache goes to `scratch`, never reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.datasets import DatasetConfig, PretrainingDatasetConfig
from schemas.paths import is_local, local_path
from worker.data.remote import download_http, download_s3, redact
from worker.errors import DataError

Entry = DatasetConfig | PretrainingDatasetConfig
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}
DS_TYPES = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow", "text": "text"}


@dataclass(frozen=True)
class Resolved:
    label: str  # how messages name the source
    content_id: str
    kind: str  # "files" | "saved" | "hub"
    files: tuple[str, ...] = ()
    builder: str = ""
    revision: str = ""


def file_digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def inside(root: Path, path: Path) -> bool:
    """True when `path` (symlinks followed) stays under `root`: a folder cannot point out of itself."""
    real_root, real = root.resolve(), path.resolve()
    return real == real_root or real_root in real.parents


def data_files_of(folder: Path, entry: Entry, label: str) -> list[Path]:
    wanted = entry.data_files
    if wanted:
        files = [folder / f for f in ([wanted] if isinstance(wanted, str) else wanted)]
        escaping = [str(f) for f in files if not inside(folder, f)]
        if escaping:
            raise DataError(
                f"{label}: data_files outside the dataset folder: {', '.join(escaping)}",
                hint="data_files are relative to the dataset folder and stay inside it",
            )
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(
                f"{label}: data_files not found: {', '.join(missing)}",
                hint="data_files are relative to the dataset folder",
            )
        return files
    files = sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix in BUILDERS
        and inside(folder, f)
        and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    )
    if not files:
        raise DataError(
            f"{label}: no data files in this folder", hint=f"put {', '.join(BUILDERS)} files in it, or give data_files"
        )
    return files


def resolve_local(path: Path, entry: Entry, label: str) -> Resolved:
    if not path.exists():
        raise DataError(f"{label}: no such file or folder", hint="check the dataset path")
    if path.is_dir() and is_saved_dataset(path):
        files = sorted(f for f in path.rglob("*") if f.is_file())
        if not all(inside(path, f) for f in files):
            raise DataError(
                f"{label}: the saved dataset links to files outside its folder", hint="copy the files into the folder"
            )
        return Resolved(label, file_digest(files, path), "saved", (str(path),))
    files = data_files_of(path, entry, label) if path.is_dir() else [path]
    ds_type = getattr(entry, "ds_type", None)
    builders = {DS_TYPES[ds_type]} if ds_type else {BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        raise DataError(
            f"{label}: cannot tell the file format from its name", hint=f"set ds_type to one of {', '.join(DS_TYPES)}"
        )
    if len(builders) > 1:
        raise DataError(
            f"{label}: mixes file formats ({', '.join(sorted(builders))})",
            hint="give one format per dataset entry (data_files or ds_type)",
        )
    files = [f for f in files if f.stat().st_size > 0]  # an empty shard of an export holds no rows
    if not files:
        raise DataError(
            f"{label}: {'the file is' if path.is_file() else 'every data file is'} empty",
            hint="check that the file was written completely",
        )
    root = path if path.is_dir() else path.parent
    return Resolved(label, file_digest(files, root), "files", tuple(str(f) for f in files), builders.pop())


def resolve_hub(entry: Entry) -> Resolved:
    from huggingface_hub import HfApi

    revision = getattr(entry, "revision", None)
    try:
        sha = HfApi().dataset_info(entry.path, revision=revision).sha
    except Exception as e:  # offline, private without a token, no such repo: the message says which
        raise DataError(
            f"{entry.path}: cannot resolve this Hub dataset{f' at revision {revision}' if revision else ''} "
            f"({type(e).__name__}: {e})",
            hint=(
                "check the dataset id, that HF_TOKEN can read it, and that the Hub is reachable; or give a local "
                "path, s3:// or https:// URI"
            ),
        ) from e
    return Resolved(entry.path, f"hub:{entry.path}@{sha}", "hub", revision=sha or "")


def resolve(entry: Entry, downloads: Path) -> Resolved:
    path = entry.path
    if is_local(path):
        return resolve_local(local_path(path), entry, path)
    if path.startswith(("s3://", "http://", "https://")):
        dest = downloads / hashlib.sha256(path.encode()).hexdigest()[:16]
        dest.mkdir(parents=True, exist_ok=True)
        fetched = download_s3(path, dest) if path.startswith("s3://") else download_http(path, dest)
        return resolve_local(fetched, entry, redact(path))
    return resolve_hub(entry)


# ---- reading -------------------------------------------------------------------------------------
def split_of(entry: Entry) -> str:
    """Local files form one split, "train"; a slice of it (train[:10%]) is honoured."""
    return entry.split if entry.split.startswith("train") else "train"


def load(res: Resolved, entry: Entry, scratch: Path) -> Any:
    import datasets

    try:
        if res.kind == "saved":
            data = datasets.load_from_disk(res.files[0])
            if isinstance(data, datasets.DatasetDict):
                split = entry.split.split("[")[0]
                if split not in data:
                    raise DataError(
                        f"{res.label}: saved dataset has no split {split!r} (it has {', '.join(data)})",
                        hint="set split",
                    )
                data = data[split]
        elif res.kind == "files":
            data = datasets.load_dataset(
                res.builder, data_files=list(res.files), split=split_of(entry), cache_dir=str(scratch)
            )
        else:
            data = datasets.load_dataset(
                entry.path,
                name=entry.name,
                split=entry.split,
                revision=res.revision or None,
                data_files=entry.data_files,
                cache_dir=str(scratch),
            )
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; find the line when it is a JSON file
        raise diagnose(res, e) from e
    shards = getattr(entry, "shards", None)
    if shards:
        data = data.shard(num_shards=shards, index=getattr(entry, "shards_idx", None) or 0)
    if len(data) == 0:
        raise DataError(f"{res.label}: the dataset is empty (0 rows)", hint="check the path, split and data_files")
    return data


NO_ROWS = "corresponds to no data"  # datasets' words for a file that parsed to nothing


def diagnose(res: Resolved, error: Exception) -> DataError:
    if res.kind == "files" and NO_ROWS in str(error):
        return DataError(
            f"{res.label}: the dataset is empty: its files hold no rows (only whitespace, an empty JSON "
            "list or a CSV header)",
            hint="check that the file was written completely",
            stage="preprocess",
        )
    if res.kind == "files" and res.builder == "json":
        for f in res.files:
            problem = first_bad_json_line(Path(f))
            if problem:
                line, msg = problem
                return DataError(
                    f"{f}: line {line}: not valid JSON ({msg})",
                    hint="fix or remove that line",
                    stage="preprocess",
                    details={"source": f, "row": line - 1, "field": None},
                )
    return DataError(
        f"{res.label}: cannot be read as {res.builder or 'a dataset'} ({type(error).__name__}: {error})",
        hint="check the file format (ds_type) and that every row has the same fields and types",
        stage="preprocess",
    )


def first_bad_json_line(path: Path) -> tuple[int, str] | None:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None  # one JSON document: the file is fine as a whole
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            return whole.lineno, whole.msg
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return n, e.msg
    return None

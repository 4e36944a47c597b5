"""Pulling a published artifact: verified against its manifest, cached by content, fetched once.

    pulled = pull("s3://bucket/prefix/run1/adapter", env)      # or hf://org/name@rev, org/name@rev,
    pulled.path                                               # a local folder, file://…, or a run id

Sources: an S3 URI; a Hub repo (`hf://org/name[@revision]` or `org/name[@revision]`; kind
`merged` reads its `merged/` folder); a local folder (returned in place, verified when it has a
manifest); a run id (the local store, else the bucket in BUCKET_NAME/FTW_S3_PREFIX), of `kind`.

Remote artifacts land in BASE_VOLUME/cache/adapters/<manifest sha256>/: the small manifest is
read first, so an artifact already cached is never downloaded again; a file lock per artifact
makes concurrent pulls (threads or processes, the serving worker's included) download it once;
files are fetched into a temp folder, checked against the manifest and renamed into place.
A Hub repo not published by ftw (no manifest.json) is cached by its commit sha instead.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas.job import RUN_ID_PATTERN
from schemas.paths import base_volume, check_local_path, is_local, local_path
from worker.errors import PublishError
from worker.publish.hub import hub_call
from worker.publish.local import publish_local, store_root, store_run_dir
from worker.publish.manifest import MANIFEST_NAME, Manifest, folder_files, read_manifest
from worker.publish.s3 import S3Location, S3Settings, download_folder, make_client, read_remote_manifest
from worker.publish.transfer import TransferSettings

HUB_SOURCE = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?$")
LOCK_TIMEOUT_S = 3600


class ArtifactMissing(PublishError):
    """The source names nothing published (no such run, repo, revision or manifest): not worth a retry."""


@dataclass(frozen=True)
class Pulled:
    path: Path
    source: str
    manifest_sha256: str | None  # None for a local folder without manifest or a non-ftw Hub repo
    cached: bool  # True when nothing was downloaded


def cache_root(env: Mapping[str, str]) -> Path:
    return base_volume(env) / "cache" / "adapters"


def pull(source: str, env: Mapping[str, str], dest: Path | None = None, kind: str = "adapter") -> Pulled:
    """Fetch `source` (verified); into `dest` when given: absent or empty, or already holding exactly
    this artifact (a repeated pull changes nothing)."""
    pulled = _resolve_and_fetch(source.strip(), env, kind)
    if dest is None:
        return pulled
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise PublishError(f"{dest} is a file", "pull into a new or empty folder")
    if dest.exists() and any(dest.iterdir()):
        if _holds(dest, pulled):
            return Pulled(dest, pulled.source, pulled.manifest_sha256, cached=True)
        raise PublishError(
            f"{dest} is not empty and does not hold this artifact",
            "pull into a new or empty folder (a folder that holds exactly this artifact is left as it is)",
        )
    publish_local(pulled.path, dest)
    return Pulled(dest, pulled.source, pulled.manifest_sha256, pulled.cached)


def _holds(folder: Path, pulled: Pulled) -> bool:
    """Whether `folder` is a verified copy of the pulled artifact: its manifest, every file, nothing else."""
    manifest = read_manifest(folder)
    want = pulled.manifest_sha256 or Manifest.of_folder(pulled.path).sha256
    return (
        manifest is not None
        and manifest.sha256 == want
        and not manifest.problems(folder)
        and {p.relative_to(folder).as_posix() for p in folder_files(folder)} == set(manifest.files)
    )


def _resolve_and_fetch(source: str, env: Mapping[str, str], kind: str) -> Pulled:
    transfer = TransferSettings.from_env(env)
    if source.startswith("s3://"):
        try:
            location = S3Location.parse(source)
        except ValueError as e:
            raise PublishError(str(e), "write s3://BUCKET/PREFIX, as the job result lists it") from None
        return _pull_s3(location, env, transfer)
    if is_local(source):
        problem = check_local_path(source, env)
        if problem:
            raise PublishError(problem, "pull from under BASE_VOLUME or FTW_ALLOWED_PATHS")
        return _pull_local(local_path(source), source)
    if "/" not in source and RUN_ID_PATTERN.fullmatch(source):
        local = store_run_dir(env, source) / kind
        if (local / MANIFEST_NAME).is_file():
            if not local.resolve().is_relative_to(store_root(env).resolve()):
                raise PublishError(f"{local} is a symlink out of the local store", "replace the link with the folder")
            return _pull_local(local, source)
        if env.get("BUCKET_NAME"):
            loc = S3Location(env["BUCKET_NAME"], (env.get("FTW_S3_PREFIX") or "").strip("/")).child(source, kind)
            return _pull_s3(loc, env, transfer)
        raise _not_in_local_store(source, kind, local.parent)
    m = HUB_SOURCE.match(source)
    if m:
        return _pull_hub(m["repo"], m["rev"] or "main", "merged/" if kind == "merged" else "", env, transfer)
    raise PublishError(
        f"cannot tell what {source!r} is",
        "use s3://bucket/prefix, hf://org/name@revision, org/name@revision, a local folder or a run id",
    )


def _not_in_local_store(run_id: str, kind: str, run_folder: Path) -> ArtifactMissing:
    """What the local store holds of the run decides the advice: another kind, or the bucket."""
    published = sorted(p.parent.name for p in run_folder.glob(f"*/{MANIFEST_NAME}"))
    if published:
        return ArtifactMissing(
            f"run {run_id!r} did not publish {kind}: the local store ({run_folder}) holds only {', '.join(published)}",
            f"pull one of those (--kind {published[0]})"
            + ("; for a merged model, run the job again with merged in publish" if kind == "merged" else ""),
        )
    return ArtifactMissing(
        f"run {run_id!r} is not in the local store ({run_folder}) and no bucket is configured",
        "give the artifact's URI from the job result (s3://…, hf://…), or set BUCKET_NAME",
    )


def _pull_local(folder: Path, source: str) -> Pulled:
    if not folder.is_dir():
        raise ArtifactMissing(f"{folder} is not a folder", "check the path")
    manifest = read_manifest(folder)
    if manifest is not None:
        manifest.verify(
            folder,
            f"{folder} does not match its manifest",
            "the folder was altered after it was published; publish it again",
        )
    return Pulled(folder, source, manifest.sha256 if manifest else None, cached=True)


def _cached(key: str, env: Mapping[str, str], source: str, fetch: Callable[[Path], Manifest]) -> Pulled:
    """The cache entry `key`, filled by `fetch(tmp_folder)` under a file lock when missing."""
    from filelock import FileLock, Timeout

    root = cache_root(env)
    final = root / key
    if (done := read_manifest(final)) is not None:
        return Pulled(final, source, done.sha256, cached=True)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(root / f".lock-{key}"), timeout=LOCK_TIMEOUT_S):
            if (done := read_manifest(final)) is not None:  # another puller finished while we waited
                return Pulled(final, source, done.sha256, cached=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
            try:
                manifest = fetch(tmp)
                manifest.verify(
                    tmp,
                    f"{source}: downloaded files do not match the manifest",
                    "the stored artifact was altered or corrupted; publish it again",
                )
                manifest.write(tmp)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except Timeout as e:
        raise PublishError(
            f"waited {LOCK_TIMEOUT_S}s for another pull of {source}", "retry; a stuck puller holds the lock"
        ) from e
    return Pulled(final, source, manifest.sha256, cached=False)


def _pull_s3(loc: S3Location, env: Mapping[str, str], transfer: TransferSettings) -> Pulled:
    client = make_client(S3Settings.from_env(env), transfer)
    manifest = read_remote_manifest(client, loc, transfer)
    if manifest is None:
        raise ArtifactMissing(
            f"{loc.uri} has no {MANIFEST_NAME}: it was never published, or its publish did not finish",
            "check the URI (the job result lists every artifact); an unfinished publish is never used",
        )
    return _cached(manifest.sha256, env, loc.uri, lambda tmp: download_folder(client, loc, tmp, transfer, manifest))


def _pull_hub(
    repo_id: str, revision: str, subfolder: str, env: Mapping[str, str], transfer: TransferSettings
) -> Pulled:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token, endpoint = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None, env.get("HF_ENDPOINT") or None
    source = f"hf://{repo_id}@{revision}" + (f" ({subfolder.rstrip('/')})" if subfolder else "")
    try:
        commit = hub_call(
            lambda: HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision).sha,
            f"resolve {source}",
            transfer,
        )
        with tempfile.TemporaryDirectory() as scratch:
            try:
                path = hf_hub_download(
                    repo_id,
                    f"{subfolder}{MANIFEST_NAME}",
                    revision=commit,
                    endpoint=endpoint,
                    token=token,
                    local_dir=scratch,
                )
                manifest = Manifest.from_bytes(Path(path).read_bytes())
            except EntryNotFoundError:
                manifest = None
    except HfHubHTTPError as e:
        error = ArtifactMissing if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)) else PublishError
        raise error(
            f"cannot read {source} from the Hub: {str(e).splitlines()[0][:300]}",
            "check the repo id and revision, and that HF_TOKEN may read it (private repos need a token)",
        ) from e
    except ValueError as e:
        raise PublishError(f"{source}: {e}", "the repo's manifest.json was not written by ftw, or was altered") from e

    def fetch(tmp: Path) -> Manifest:
        raw = tmp / ".raw"
        patterns = [f"{subfolder}{rel}" for rel in manifest.files] if manifest else [f"{subfolder}*"]
        try:
            hub_call(
                lambda: snapshot_download(
                    repo_id, revision=commit, endpoint=endpoint, token=token, local_dir=raw, allow_patterns=patterns
                ),
                f"download {source}",
                transfer,
            )
        except Exception as e:
            raise PublishError(
                f"download of {source} failed after retries: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                "the Hub or the network failed repeatedly; retry the pull",
            ) from e
        shutil.rmtree(raw / ".cache", ignore_errors=True)  # snapshot_download's own bookkeeping
        base = raw / subfolder if subfolder else raw
        got = manifest or Manifest.of_folder(base)
        for rel in got.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).replace(tmp / rel)
        shutil.rmtree(raw)
        return got

    key = (
        manifest.sha256 if manifest else "hub-" + hashlib.sha256(f"{repo_id}@{commit}/{subfolder}".encode()).hexdigest()
    )
    pulled = _cached(key, env, source, fetch)
    return pulled if manifest else Pulled(pulled.path, source, None, pulled.cached)

"""S3 and S3-compatible stores (R2, MinIO, B2, rclone…): verified, retried, never partial uploads.

A client is made from one `S3Settings` (endpoint, region, key pair) and nothing else: a job's
settings come from its PublishPlan (targets.py: the job's credentials, its s3Config, then the
endpoint's), a pull's from the endpoint's environment (`S3Settings.from_env`). Only with no key
pair anywhere does boto3 look further (its own chain: instance roles). Never a file the job names.

`upload_folder` deletes the prefix's old manifest, uploads every file (multipart with parallel
parts through s3transfer, each file retried with backoff), checks every object's size, and puts
`manifest.json` last. A publish that fails anywhere leaves no manifest, so no reader takes it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from worker.errors import PublishError
from worker.publish.manifest import MANIFEST_NAME, Manifest
from worker.publish.transfer import Fatal, Progress, ProgressSink, TransferSettings, log, with_retries

FATAL_CODES = {
    "NoSuchBucket": "the bucket does not exist: create it, or fix outputs.s3.bucket",
    "AccessDenied": "the credentials may not write/read this bucket: check the key's permissions",
    "InvalidAccessKeyId": "the access key is unknown to the store: check BUCKET_ACCESS_KEY_ID / AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key is wrong: check BUCKET_SECRET_ACCESS_KEY / AWS_SECRET_ACCESS_KEY",
    "InvalidBucketName": "fix outputs.s3.bucket",
    "AuthorizationHeaderMalformed": "set outputs.s3.region (or AWS_REGION) to the bucket's region",
    "PermanentRedirect": "set outputs.s3.region (or AWS_REGION) to the bucket's region",
}
_SESSION = None
_SESSION_LOCK = threading.Lock()
T = TypeVar("T")
S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<key>.*)$")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing '/'

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        m = S3_URI.match(uri)
        if not m:
            raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
        return cls(m["bucket"], m["key"].strip("/"))

    def child(self, *parts: str) -> S3Location:
        return S3Location(self.bucket, "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/")))

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Settings:
        """The endpoint's own S3 settings: RunPod's BUCKET_* key pair, else AWS_*."""
        pairs = [
            (env.get("BUCKET_ACCESS_KEY_ID"), env.get("BUCKET_SECRET_ACCESS_KEY"), None),
            (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN")),
        ]
        key, secret, token = next(((k, s, t) for k, s, t in pairs if k and s), (None, None, None))
        endpoint = (
            env.get("BUCKET_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        )
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        return cls(endpoint, region, key, secret, token or None)


def make_client(settings: S3Settings, transfer: TransferSettings) -> Any:
    import boto3
    from botocore.config import Config

    custom = settings.endpoint_url is not None
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(10, transfer.concurrency * 2),
        s3={"addressing_style": "path" if custom else "auto"},
        # S3-compatible stores often reject the newer streaming checksums; the manifest's sha256
        # is what proves integrity end to end.
        request_checksum_calculation="when_required" if custom else "when_supported",
        response_checksum_validation="when_required" if custom else "when_supported",
    )
    with _SESSION_LOCK:  # one botocore session: its loaded service model is reused (≈1 s per fresh session)
        global _SESSION
        _SESSION = _SESSION or boto3.session.Session()
        return _SESSION.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            config=config,
            region_name=settings.region or ("us-east-1" if custom else None),
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            aws_session_token=settings.session_token,
        )


def _transfer_config(transfer: TransferSettings) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=transfer.part_bytes,
        multipart_chunksize=transfer.part_bytes,
        max_concurrency=transfer.concurrency,
        use_threads=True,
        num_download_attempts=2,
    )


def fatal_or_raise(e: Exception, what: str) -> None:
    """Raise `Fatal(PublishError)` for errors no retry fixes; return for transient ones."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        raise Fatal(
            PublishError(
                f"{what}: no S3 credentials",
                "set BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY (or AWS_*) on the endpoint, or send s3Config",
            )
        )
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in FATAL_CODES:
            err = PublishError(f"{what}: the store answered {code}", FATAL_CODES[code], details={"s3_error": code})
            err.retryable = False
            raise Fatal(err)


def _guarded(fn: Callable[[], T], what: str) -> Callable[[], T]:
    def call() -> T:
        try:
            return fn()
        except Exception as e:
            fatal_or_raise(e, what)
            raise

    return call


def _failed(what: str, e: Exception, loc: S3Location) -> PublishError:
    if isinstance(e, PublishError):
        return e
    return PublishError(
        f"{what} failed after retries: {type(e).__name__}: {e}",
        "the store or the network failed repeatedly; the run folder is intact, so resubmitting the "
        "same run_id publishes again (nothing partial was marked complete)",
        details={"uri": loc.uri},
    )


@contextlib.contextmanager
def _as_publish_error(
    label: str, loc: S3Location, passthrough: tuple[type[BaseException], ...] = (PublishError,)
) -> Iterator[None]:
    """Any failure of a transfer becomes one PublishError naming it; typed ones pass through."""
    try:
        yield
    except passthrough:
        raise
    except Fatal as e:
        raise e.error from None
    except Exception as e:
        raise _failed(label, e, loc) from e


def upload_folder(
    client: Any,
    folder: Path,
    loc: S3Location,
    transfer: TransferSettings,
    label: str = "",
    progress_sink: ProgressSink | None = None,
) -> Manifest:
    """Upload `folder` to `loc`; manifest.json last. Returns the manifest; PublishError on failure."""
    from boto3.s3.transfer import create_transfer_manager

    label = label or f"upload {loc.uri}"
    manifest = Manifest.of_folder(folder)
    progress = Progress(label, manifest.total_bytes, progress_sink)
    with _as_publish_error(
        label, loc, passthrough=(PublishError, FileNotFoundError)
    ):  # a local file gone (a rotated checkpoint) is the caller's to judge
        with_retries(
            _guarded(lambda: client.delete_object(Bucket=loc.bucket, Key=loc.key(MANIFEST_NAME)), label),
            label,
            transfer,
        )
        with create_transfer_manager(client, _transfer_config(transfer)) as manager:
            pending = list(manifest.files)
            for attempt in range(transfer.attempts):
                futures = {
                    rel: manager.upload(str(folder / rel), loc.bucket, loc.key(rel), subscribers=[_Bytes(progress)])
                    for rel in pending
                }
                pending = _failed_files(futures, label, progress, manifest, last=attempt == transfer.attempts - 1)
                if not pending:
                    break
                _pause(transfer, attempt, label, pending)
        for rel, entry in manifest.files.items():  # every object there, at its size, before the manifest
            head = with_retries(
                _guarded(functools.partial(client.head_object, Bucket=loc.bucket, Key=loc.key(rel)), label),
                label,
                transfer,
            )
            if head["ContentLength"] != entry["size"]:
                raise PublishError(
                    f"{label}: {rel} is {head['ContentLength']} bytes in the store, expected {entry['size']}",
                    "another writer may be using the same prefix; use a distinct run_id or prefix",
                )
        body = manifest.to_bytes()
        with_retries(
            _guarded(
                lambda: client.put_object(
                    Bucket=loc.bucket, Key=loc.key(MANIFEST_NAME), Body=body, ContentType="application/json"
                ),
                label,
            ),
            label,
            transfer,
        )
    progress.report()
    return manifest


class _Bytes:
    """s3transfer subscriber → Progress."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self.progress(bytes_transferred)


def _failed_files(futures: dict[str, Any], label: str, progress: Progress, manifest: Manifest, last: bool) -> list[str]:
    """Wait for every future; the files that failed (a fatal error or the last try raises)."""
    failed: list[str] = []
    first_error: Exception | None = None
    for rel, future in futures.items():
        try:
            future.result()
        except (FileNotFoundError, PublishError):  # a folder gone, or the job let go of this transfer: no retry
            raise
        except Exception as e:
            fatal_or_raise(e, label)
            failed.append(rel)
            first_error = first_error or e
            progress.rewind(int(manifest.files[rel]["size"]))
    if first_error is not None and last:
        raise first_error
    return failed


def _pause(transfer: TransferSettings, attempt: int, label: str, pending: list[str]) -> None:
    delay = transfer.backoff_s * 2**attempt
    log.warning(
        "%s: %d file(s) failed (try %d/%d); retrying in %.1fs",
        label,
        len(pending),
        attempt + 1,
        transfer.attempts,
        delay,
    )
    time.sleep(delay)


def read_remote_manifest(client: Any, loc: S3Location, transfer: TransferSettings) -> Manifest | None:
    """The manifest at `loc`, or None when the prefix has none (not published, or not complete)."""
    from botocore.exceptions import ClientError

    def get() -> bytes | None:
        try:
            data: bytes = client.get_object(Bucket=loc.bucket, Key=loc.key(MANIFEST_NAME))["Body"].read()
            return data
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    try:  # no credentials, access denied, no such bucket: said at once, not after every retry
        data = with_retries(_guarded(get, f"read {loc.uri}"), f"read {loc.key(MANIFEST_NAME)}", transfer)
    except PublishError:
        raise
    except Exception as e:
        raise _failed(f"read {loc.uri}/{MANIFEST_NAME}", e, loc) from e
    if data is None:
        return None
    try:
        return Manifest.from_bytes(data)
    except ValueError as e:
        raise PublishError(
            f"{loc.uri}/{MANIFEST_NAME}: {e}", "the prefix was not written by ftw, or was altered"
        ) from e


def download_folder(
    client: Any, loc: S3Location, dest: Path, transfer: TransferSettings, manifest: Manifest | None = None
) -> Manifest:
    """Download the files of `loc`'s manifest into `dest` (which should be empty), each verified by sha256."""
    from boto3.s3.transfer import create_transfer_manager

    manifest = manifest or read_remote_manifest(client, loc, transfer)
    if manifest is None:
        raise PublishError(
            f"{loc.uri} has no {MANIFEST_NAME}: it was never published, or its publish did not finish",
            "check the URI (ftw lists artifacts in the job result); an unfinished publish is never used",
        )
    label = f"download {loc.uri}"
    progress = Progress(label, manifest.total_bytes)
    pending = list(manifest.files)
    with _as_publish_error(label, loc):
        with create_transfer_manager(client, _transfer_config(transfer)) as manager:
            for attempt in range(transfer.attempts):
                futures = {}
                for rel in pending:
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    futures[rel] = manager.download(
                        loc.bucket, loc.key(rel), str(dest / rel), subscribers=[_Bytes(progress)]
                    )
                pending = _failed_files(futures, label, progress, manifest, last=attempt == transfer.attempts - 1)
                bad = [
                    rel for rel in futures if rel not in pending and Manifest({rel: manifest.files[rel]}).problems(dest)
                ]
                pending += bad
                if not pending:
                    break
                if attempt == transfer.attempts - 1:
                    raise PublishError(
                        f"{label}: {', '.join(bad)} did not match the manifest's sha256 "
                        f"after {transfer.attempts} tries",
                        "the stored object differs from what was published (altered or corrupted in the store)",
                        details={"uri": loc.uri, "files": bad},
                    )
                _pause(transfer, attempt, label, pending)
    progress.report()
    return manifest


def list_children(client: Any, loc: S3Location, transfer: TransferSettings) -> list[str]:
    """Names of the 'folders' directly under `loc` (CommonPrefixes)."""

    def listing() -> list[str]:
        names, token = [], None
        while True:
            kw = {
                "Bucket": loc.bucket,
                "Prefix": loc.key(""),
                "Delimiter": "/",
                **({"ContinuationToken": token} if token else {}),
            }
            page = client.list_objects_v2(**kw)
            names += [p["Prefix"][len(loc.key("")) :].strip("/") for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return names
            token = page["NextContinuationToken"]

    try:
        return with_retries(_guarded(listing, f"list {loc.uri}"), f"list {loc.uri}", transfer)
    except PublishError:
        raise
    except Exception as e:
        raise _failed(f"list {loc.uri}", e, loc) from e


def delete_prefix(client: Any, loc: S3Location, transfer: TransferSettings) -> None:
    """Remove an artifact: its manifest first (it stops being complete), then its objects."""
    keys = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key("")):
        keys += [o["Key"] for o in page.get("Contents", [])]
    manifest_key = loc.key(MANIFEST_NAME)
    if manifest_key in keys:
        with_retries(
            lambda: client.delete_object(Bucket=loc.bucket, Key=manifest_key), f"delete {manifest_key}", transfer
        )
    for key in keys:
        if key != manifest_key:
            with_retries(functools.partial(client.delete_object, Bucket=loc.bucket, Key=key), f"delete {key}", transfer)

"""Remote data files: s3:// (any S3-compatible endpoint) and http(s):// URLs, downloaded to a folder.

S3 credentials come from the endpoint's environment: BUCKET_ENDPOINT_URL / BUCKET_ACCESS_KEY_ID /
BUCKET_SECRET_ACCESS_KEY (RunPod's names) or the standard AWS_* variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION). An s3:// URI names one
object, or a prefix whose objects are all downloaded (a folder of data files).
"""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from worker.errors import DataError

CREDENTIAL_HINT = "set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or AWS_*) on the endpoint, and check the URI"


def s3_client():
    import boto3
    from botocore.config import Config

    env = os.environ
    endpoint = env.get("BUCKET_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env.get("BUCKET_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("BUCKET_SECRET_ACCESS_KEY") or env.get("AWS_SECRET_ACCESS_KEY") or None,
        aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(s3={"addressing_style": "path"} if endpoint else {}, retries={"max_attempts": 5, "mode": "standard"}),
    )


def download_s3(uri: str, dest: Path) -> Path:
    """The object (a file under dest) or every object under the prefix (dest itself)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise DataError(f"{uri}: no bucket in the URI", hint="write s3://BUCKET/KEY")
    client = s3_client()
    try:
        keys = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for obj in page.get("Contents", [])
        ]
        if key in keys and not key.endswith("/"):
            target = dest / Path(key).name
            client.download_file(bucket, key, str(target))
            return target
        prefix = key.rstrip("/") + "/" if key else ""
        inside = [k for k in keys if k.startswith(prefix) and not k.endswith("/")]
        if not inside:
            raise DataError(f"{uri}: no object or folder at this URI", hint=CREDENTIAL_HINT)
        for k in inside:
            target = dest / k[len(prefix):]
            if ".." in Path(k[len(prefix):]).parts or Path(k[len(prefix):]).is_absolute():
                raise DataError(f"{uri}: object key {k!r} would be written outside the download folder", hint="rename the object")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, k, str(target))
        return dest
    except (BotoCoreError, ClientError) as e:
        raise DataError(f"{uri}: cannot download from S3 ({type(e).__name__}: {e})", hint=CREDENTIAL_HINT) from e


def redact(uri: str) -> str:
    """A URI as messages may show it: no user:password, no query string (presigned signatures)."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def download_http(url: str, dest: Path) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name or "data"
    target = dest / name
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError) as e:
        detail = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else str(getattr(e, "reason", e))
        raise DataError(f"{redact(url)}: cannot download ({detail})", hint="check that the URL is reachable from the worker") from e
    return target

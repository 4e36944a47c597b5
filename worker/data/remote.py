"""Remote data files: s3:// (any S3-compatible endpoint) and http(s):// URLs, downloaded to a folder.

S3 credentials come from the endpoint's environment: BUCKET_ENDPOINT_URL / BUCKET_ACCESS_KEY_ID /
BUCKET_SECRET_ACCESS_KEY (RunPod's names) or the standard AWS_* variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION). An s3:// URI names one
object, or a prefix whose objects are all downloaded (a folder of data files).

An http(s) URL is fetched only from a public host (schemas.hosts: the name is resolved once, every
address checked, the connection made to a checked one; each redirect hop the same; no proxy), and
at most FTW_MAX_DOWNLOAD_MB (20480) of it: a job cannot make the worker reach its own network.
"""

from __future__ import annotations

import functools
import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from schemas.hosts import allowed_addresses, check_url
from schemas.hosts import public_form as redact
from worker.errors import DataError

MB = 1 << 20
MAX_DOWNLOAD_ENV = "FTW_MAX_DOWNLOAD_MB"
DEFAULT_MAX_DOWNLOAD_MB = 20480

CREDENTIAL_HINT = (
    "set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or AWS_*) on the endpoint, "
    "and check the URI"
)


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
        config=Config(
            s3={"addressing_style": "path"} if endpoint else {}, retries={"max_attempts": 5, "mode": "standard"}
        ),
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
            target = dest / k[len(prefix) :]
            if ".." in Path(k[len(prefix) :]).parts or Path(k[len(prefix) :]).is_absolute():
                raise DataError(
                    f"{uri}: object key {k!r} would be written outside the download folder", hint="rename the object"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, k, str(target))
        return dest
    except (BotoCoreError, ClientError) as e:
        raise DataError(f"{uri}: cannot download from S3 ({type(e).__name__}: {e})", hint=CREDENTIAL_HINT) from e


class GuardedConnection:
    """Mixed into http.client's connections: the socket goes to an address the host policy accepted
    (schemas.hosts); TLS, set up by the parent on that socket, still checks the host's certificate."""

    def __init__(self, *args: Any, env: Mapping[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = lambda address, timeout, source=None: connect_checked(
            self.host, self.port, timeout, env
        )


class GuardedHTTPConnection(GuardedConnection, http.client.HTTPConnection):
    pass


class GuardedHTTPSConnection(GuardedConnection, http.client.HTTPSConnection):
    pass


def connect_checked(host: str, port: int, timeout: Any, env: Mapping[str, str]) -> socket.socket:
    """A TCP connection to the first reachable address of `host` that the policy accepts (all must)."""
    error: OSError | None = None
    for family, kind, proto, _, address in allowed_addresses(host, port, env):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"no address for {host}")


class CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Every hop is a URL the job could have named itself (the connection checks its addresses)."""

    max_redirections = 5

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        problem = check_url(newurl, self.env, "redirect target")
        if problem:
            raise PermissionError(problem)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, env: Mapping[str, str]):
        super().__init__()
        self.env = env

    def http_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPConnection, env=self.env), req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, env: Mapping[str, str]):
        super().__init__()
        self.env = env

    def https_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPSConnection, env=self.env), req, context=self._context)


def guarded_opener(env: Mapping[str, str]) -> urllib.request.OpenerDirector:
    """urllib without proxies (a proxy would reach what the policy refuses), every hop checked."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), GuardedHTTPHandler(env), GuardedHTTPSHandler(env), CheckedRedirects(env)
    )


def max_download_bytes(env: Mapping[str, str]) -> int:
    raw = env.get(MAX_DOWNLOAD_ENV) or str(DEFAULT_MAX_DOWNLOAD_MB)
    try:
        return int(float(raw) * MB)
    except ValueError:
        raise DataError(
            f"{MAX_DOWNLOAD_ENV}={raw[:40]!r} is not a number of MB", hint="the operator sets it, e.g. 20480"
        ) from None


def download_http(url: str, dest: Path, env: Mapping[str, str] | None = None) -> Path:
    """The URL's body as a file under dest: public hosts only (schemas.hosts), at most the size cap."""
    env = os.environ if env is None else env
    problem = check_url(url, env, "dataset URL")
    if problem:
        raise DataError(problem, hint="download the file to BASE_VOLUME and name it there, or use a public URL")
    limit = max_download_bytes(env)
    name = Path(urllib.parse.urlparse(url).path).name or "data"
    target = dest / name
    try:
        with guarded_opener(env).open(url, timeout=60) as response, open(target, "wb") as f:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise TooLarge(int(declared))
            done = 0
            while chunk := response.read(1 << 20):
                done += len(chunk)
                if done > limit:
                    raise TooLarge(done)
                f.write(chunk)
    except TooLarge as e:
        target.unlink(missing_ok=True)
        raise DataError(
            f"{redact(url)}: the download is larger than the {limit // MB} MB cap ({e.args[0]} bytes or more)",
            hint=f"ask the endpoint operator to raise {MAX_DOWNLOAD_ENV}, or put the data in S3",
        ) from None
    except PermissionError as e:
        target.unlink(missing_ok=True)
        raise DataError(
            f"{redact(url)}: {e}", hint="download the file to BASE_VOLUME and name it there, or use a public URL"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        target.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        if isinstance(reason, PermissionError):
            raise DataError(
                f"{redact(url)}: {reason}",
                hint="download the file to BASE_VOLUME and name it there, or use a public URL",
            ) from None
        detail = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else str(reason)
        raise DataError(
            f"{redact(url)}: cannot download ({detail[:300]})", hint="check that the URL is reachable from the worker"
        ) from e
    return target


class TooLarge(Exception):
    pass

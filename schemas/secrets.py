"""Where a job's secrets come from, where they may go (a child's environment), and their redaction.

Secrets reach ftw three ways: the endpoint's environment (HF_TOKEN, AWS_*, BUCKET_*, WANDB_API_KEY,
any *TOKEN*/*SECRET*/*PASSWORD*/*API_KEY* variable), the job's `credentials`, and RunPod's
`s3Config`. They are put only into the environment of the stage children; everything the
orchestrator writes or returns (config.json, job.json, checks.json, logs, result, error text,
validation messages, the local endpoint's store) goes through `Redactor`, the one masker. Besides
the known secret values it masks what is secret by its shape: `user:password@` in URLs, the
signature/credential/token parameters of presigned URLs, and string values under keys named like
a secret (`hf_token`, `apiKey`, `password`) wherever they sit. Every scan is linear in the text
(one pass per known secret, and patterns that cannot backtrack), so a 10 MB value costs a
fraction of a second, never minutes (bench/validate.py). Pure functions; no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# Names of the job's `credentials` fields → the environment variable each becomes in a child.
CREDENTIAL_ENV = {
    "hf_token": "HF_TOKEN",
    "wandb_api_key": "WANDB_API_KEY",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}
# RunPod's per-job s3Config → the BUCKET_* names the endpoint environment uses.
S3CONFIG_ENV = {
    "accessId": "BUCKET_ACCESS_KEY_ID",
    "accessSecret": "BUCKET_SECRET_ACCESS_KEY",
    "bucketName": "BUCKET_NAME",
    "endpointUrl": "BUCKET_ENDPOINT_URL",
}
S3CONFIG_SECRET_KEYS = ("accessId", "accessSecret")
# Variables a stage child never needs: the worker's own platform credentials.
CHILD_EXCLUDED = (
    "RUNPOD_AI_API_KEY",
    "RUNPOD_API_KEY",
    "RUNPOD_WEBHOOK_",
    "FTW_ENDPOINT_API_KEY",
    "FTW_ENDPOINT_WORKER_KEY",
)
# The values config.json holds masked (a presigned dataset URL) reach the stage children here, as
# JSON [[path, value], ...]: a child's environment is the one place a secret may go.
CONFIG_SECRETS_ENV = "FTW_CONFIG_SECRETS"
MIN_SECRET_LEN = 4
# `scheme://user:password@host`: found by its literal "://" (the scheme's last character checked
# behind it), and the userinfo stops at the first '/', '?', '#', '@' or space, so no character is
# scanned twice. (The same pattern starting with the lookbehind is 70x slower: no literal prefix.)
URL_USERINFO = r"://(?<=[A-Za-z0-9+.-]://)[^/?#@\s]+@"
# the secret parameters of presigned URLs (S3/GCS/Azure SAS) and of tokens passed in a query
QUERY_SECRET = (
    r"(?i)([?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    r"|sig|signature|token|access_token|id_token|refresh_token|auth|api_key|apikey|key|password|secret"
    r"|client_secret)=)[^&#\s\"'<>]+"
)
# a key whose string value is a secret, in snake_case after camelCase is split (apiKey -> api_key);
# `pad_token`/`eos_token` (tokenizer tokens) are not secrets, hence the named *_token prefixes
SECRET_KEY = re.compile(
    r"(?:^|_)(?:password|passwd|passphrase|secret|credentials?|api_?key|access_?key|private_?key"
    r"|(?:hf|hub|api|auth|access|refresh|session|id|bearer|github|gh|gitlab|wandb|oauth)_?token)(?:_|$)"
    r"|^token$"
)
MAX_KEY_NAME = 64  # a longer "key" is no name; its text is still masked as text
MAX_LINE_HOLD = 65536  # a log line is held back until complete (so a URL split across reads is caught) up to this size
MASK = "***"


# A variable named like a secret whose value is a plain word is a setting, not a credential
# (`TOKENIZERS_PARALLELISM=false`, `HF_HUB_DISABLE_TOKEN_CHECK=true`): masking it would turn every
# JSON `false` in a log into the mask and break the stage summary the orchestrator reads.
NOT_SECRET_VALUE = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off"})


def env_secrets(env: Mapping[str, str]) -> list[str]:
    return [
        v
        for k, v in env.items()
        if SECRET_NAME.search(k) and len(v or "") >= MIN_SECRET_LEN and v.strip().lower() not in NOT_SECRET_VALUE
    ]


def job_credential_env(credentials: Any, s3_config: Mapping[str, Any] | None) -> dict[str, str]:
    """Environment entries carrying the job's own credentials (job `credentials`, RunPod s3Config)."""
    out: dict[str, str] = {}
    for field, name in CREDENTIAL_ENV.items():
        value = getattr(credentials, field, None) if credentials is not None else None
        if value is not None and value.get_secret_value():
            out[name] = value.get_secret_value()
    for key, name in S3CONFIG_ENV.items():
        value = s3_config.get(key) if isinstance(s3_config, Mapping) else None
        if isinstance(value, str) and value:
            out[name] = value
    return out


def child_env(base: Mapping[str, str], credential_env: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a stage child: the endpoint's, minus platform keys, plus the job's secrets."""
    env = {k: v for k, v in base.items() if not k.startswith(CHILD_EXCLUDED)}
    env.update(credential_env)
    env.update(extra)
    return env


def secret_key(key: Any) -> bool:
    """Whether a mapping key names a secret (`hf_token`, `aws_secret_access_key`, `apiKey`)."""
    if not isinstance(key, str) or len(key) > MAX_KEY_NAME:
        return False
    return bool(SECRET_KEY.search(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower().replace("-", "_")))


class Redactor:
    """Replaces every known secret, and whatever is secret by its shape, with *** in text, bytes
    and JSON-like data."""

    def __init__(self, secrets: Iterable[str]):
        unique = {s for s in secrets if s and len(s) >= MIN_SECRET_LEN}
        self.secrets = sorted(unique, key=len, reverse=True)
        self._bsecrets = [s.encode() for s in self.secrets]
        self.longest = max((len(b) for b in self._bsecrets), default=0)

    @classmethod
    def for_job(
        cls, env: Mapping[str, str], credential_env: Mapping[str, str], s3_config: Mapping[str, Any] | None = None
    ) -> Redactor:
        # the job's credentials by their variable names: s3Config's bucket name and endpoint are no secret
        values = env_secrets(env) + env_secrets(credential_env)
        s3 = s3_config if isinstance(s3_config, Mapping) else {}
        values += [str(v) for k, v in s3.items() if k in S3CONFIG_SECRET_KEYS and v]
        return cls(values)

    def text(self, value: str) -> str:
        for s in self.secrets:
            value = value.replace(s, MASK)
        value = _URL_USERINFO.sub(f"://{MASK}@", value)
        return _QUERY_SECRET.sub(rf"\1{MASK}", value) if "=" in value else value

    def bytes(self, value: bytes) -> bytes:
        for s in self._bsecrets:
            value = value.replace(s, MASK.encode())
        value = _BURL_USERINFO.sub(f"://{MASK}@".encode(), value)
        return _BQUERY_SECRET.sub(rb"\1" + MASK.encode(), value) if b"=" in value else value

    def data(self, value: Any) -> Any:
        """A copy of a JSON-like structure with every string redacted (keys included); the string
        value of a key named like a secret is masked whole."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {
                self.text(str(k)): MASK if isinstance(v, str) and v and secret_key(k) else self.data(v)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value

    def record(self, value: Mapping[str, Any]) -> dict[str, Any]:
        """`data` of a JSON object (a result, a job), typed as the object it stays."""
        redacted: dict[str, Any] = self.data(value)
        return redacted


_URL_USERINFO, _BURL_USERINFO = re.compile(URL_USERINFO), re.compile(URL_USERINFO.encode())
_QUERY_SECRET, _BQUERY_SECRET = re.compile(QUERY_SECRET), re.compile(QUERY_SECRET.encode())
SHAPES = Redactor(())  # masks only what is secret by its shape: for text with no known secrets at hand


def masked_values(original: Any, redacted: Any, path: tuple[Any, ...] = ()) -> list[list[Any]]:
    """[[path, original string]] for every string that `redacted` (Redactor.data of `original`) masked."""
    if isinstance(original, str):
        return [[list(path), original]] if original != redacted else []
    if isinstance(original, Mapping) and isinstance(redacted, Mapping):
        pairs = zip(original.items(), redacted.values())
        return [m for (k, v), r in pairs for m in masked_values(v, r, (*path, k))]
    if isinstance(original, (list, tuple)) and isinstance(redacted, list):
        return [m for i, (v, r) in enumerate(zip(original, redacted)) for m in masked_values(v, r, (*path, i))]
    return []


def restore_masked(document: Any, masked_json: str | None) -> Any:
    """The document with the values `masked_values` listed put back (in a stage child, from its environment)."""
    if not masked_json:
        return document
    for path, value in json.loads(masked_json):
        holder = document
        for part in path[:-1]:
            holder = holder[part]
        holder[path[-1]] = value
    return document


class StreamRedactor:
    """Redacts a byte stream that arrives in arbitrary chunks. A line is held back until it is
    complete (up to MAX_LINE_HOLD bytes), so a secret or a URL split across two reads is still
    caught; past that size, the last (longest secret - 1) bytes are held back."""

    def __init__(self, redactor: Redactor):
        self.redactor = redactor
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.redactor.bytes(self.pending + chunk)
        line_end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        keep = len(data) - line_end
        if keep > MAX_LINE_HOLD:
            keep = max(self.redactor.longest - 1, 0)
        self.pending, data = (data[len(data) - keep :], data[: len(data) - keep]) if keep else (b"", data)
        return data

    def flush(self) -> bytes:
        data, self.pending = self.redactor.bytes(self.pending), b""
        return data

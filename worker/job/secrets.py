"""Where a job's secrets come from, where they may go (a child's environment), and their redaction.

Secrets reach ftw three ways: the endpoint's environment (HF_TOKEN, AWS_*, BUCKET_*, WANDB_API_KEY,
any *TOKEN*/*SECRET*/*PASSWORD*/*API_KEY* variable), the job's `credentials`, and RunPod's
`s3Config`. They are put only into the environment of the stage children; everything the
orchestrator writes or returns (config.json, logs, result, error text) goes through `Redactor`,
which also strips `user:password@` from URLs. Pure functions; no I/O.
"""
from __future__ import annotations

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
CHILD_EXCLUDED = ("RUNPOD_AI_API_KEY", "RUNPOD_API_KEY", "RUNPOD_WEBHOOK_", "FTW_ENDPOINT_API_KEY", "FTW_ENDPOINT_WORKER_KEY")
MIN_SECRET_LEN = 4
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
MASK = "***"


def env_secrets(env: Mapping[str, str]) -> list[str]:
    return [v for k, v in env.items() if SECRET_NAME.search(k) and len(v or "") >= MIN_SECRET_LEN]


def job_credential_env(credentials: Any, s3_config: Mapping[str, Any] | None) -> dict[str, str]:
    """Environment entries carrying the job's own credentials (job `credentials`, RunPod s3Config)."""
    out: dict[str, str] = {}
    for field, name in CREDENTIAL_ENV.items():
        value = getattr(credentials, field, None) if credentials is not None else None
        if value is not None and value.get_secret_value():
            out[name] = value.get_secret_value()
    for key, name in S3CONFIG_ENV.items():
        value = (s3_config or {}).get(key)
        if isinstance(value, str) and value:
            out[name] = value
    return out


def child_env(base: Mapping[str, str], credential_env: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a stage child: the endpoint's, minus platform keys, plus the job's secrets."""
    env = {k: v for k, v in base.items() if not k.startswith(CHILD_EXCLUDED)}
    env.update(credential_env)
    env.update(extra)
    return env


class Redactor:
    """Replaces every known secret (and URL userinfo) with *** in text, bytes and JSON-like data."""

    def __init__(self, secrets: Iterable[str]):
        unique = {s for s in secrets if s and len(s) >= MIN_SECRET_LEN}
        self.secrets = sorted(unique, key=len, reverse=True)
        self._bsecrets = [s.encode() for s in self.secrets]
        self.longest = max((len(b) for b in self._bsecrets), default=0)

    @classmethod
    def for_job(cls, env: Mapping[str, str], credential_env: Mapping[str, str], s3_config: Mapping[str, Any] | None = None) -> Redactor:
        values = env_secrets(env) + list(credential_env.values())
        values += [str(v) for k, v in (s3_config or {}).items() if k in S3CONFIG_SECRET_KEYS and v]
        return cls(values)

    def text(self, value: str) -> str:
        for s in self.secrets:
            value = value.replace(s, MASK)
        return URL_USERINFO.sub(rf"\g<scheme>{MASK}@", value)

    def bytes(self, value: bytes) -> bytes:
        for s in self._bsecrets:
            value = value.replace(s, MASK.encode())
        return value

    def data(self, value: Any) -> Any:
        """A copy of a JSON-like structure with every string redacted (keys included)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.text(str(k)): self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value


class StreamRedactor:
    """Redacts a byte stream that arrives in arbitrary chunks: a secret split across two reads is
    still caught, because the last (longest secret - 1) bytes are held back until the next chunk."""

    def __init__(self, redactor: Redactor):
        self.redactor = redactor
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.redactor.bytes(self.pending + chunk)
        keep = max(self.redactor.longest - 1, 0)
        if keep and len(data) > keep:
            self.pending, data = data[-keep:], data[:-keep]
        elif keep:
            self.pending, data = data, b""
        return data

    def flush(self) -> bytes:
        data, self.pending = self.redactor.bytes(self.pending), b""
        return data

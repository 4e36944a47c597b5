"""Secrets at rest in the local endpoint's job store: what a job payload keeps once the job ended.

A payload carries secrets in RunPod's `s3Config` and in the job's `credentials` (in the input, or
in the input's own {"input": …} envelope, which the handler also accepts). The worker needs them
while the job may still be taken; after that the store keeps only their key names, and every
other value that is secret by its shape (a presigned URL's signature, a password in a URL, a
config key named like a credential) is masked by the one masker, schemas.secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.secrets import CREDENTIAL_ENV, S3CONFIG_ENV, SHAPES

REMOVED_SECRETS = "removedSecrets"
RESUBMIT_WITH_SECRETS = "submit it again with its credentials/s3Config (the same run_id resumes the run)"


def without_secrets(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with s3Config and credentials replaced by their key names under `removedSecrets`."""
    removed = dict(payload.get(REMOVED_SECRETS) or {})
    out = {k: v for k, v in payload.items() if k != "s3Config"}
    if "s3Config" in payload:
        removed["s3Config"] = _key_names(payload["s3Config"], S3CONFIG_ENV)
    job_input = out.get("input")
    if isinstance(job_input, dict):
        out["input"] = job_input = _without_credentials(job_input, "input.", removed)
        if isinstance(job_input.get("input"), dict):
            job_input["input"] = _without_credentials(job_input["input"], "input.input.", removed)
    return SHAPES.data({**out, REMOVED_SECRETS: removed} if removed else out)


def has_secrets(payload: dict[str, Any]) -> bool:
    """Whether ending the job removes anything (then /retry cannot run it again as it was)."""
    return without_secrets(payload) != payload


def _without_credentials(holder: dict[str, Any], where: str, removed: dict[str, list[str]]) -> dict[str, Any]:
    if "credentials" not in holder:
        return holder
    removed[where + "credentials"] = _key_names(holder["credentials"], CREDENTIAL_ENV)
    return {k: v for k, v in holder.items() if k != "credentials"}


def _key_names(value: Any, known: Mapping[str, str]) -> list[str]:
    """Known key names only: an unknown key might be a token pasted in the wrong place."""
    if not isinstance(value, dict):
        return []
    return sorted(k if k in known else "(unrecognised key)" for k in value)

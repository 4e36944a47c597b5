"""Where a job's artifacts go and with which credentials: a `PublishPlan`, resolved once per job.

The orchestrator builds the plan right after validation, from the job, RunPod's s3Config and the
endpoint's environment, and hands the same plan to the checkpoint uploader, the checkpoint restore
and the final publish; nothing below reads a credential from anywhere else.

- S3 when the job has outputs.s3, else when s3Config.bucketName or the endpoint's BUCKET_NAME names
  a bucket (prefix: FTW_S3_PREFIX). Artifacts of a run live under s3://bucket/prefix/<run_id>/.
  Key pair: the job's credentials.aws_*, else s3Config's accessId/accessSecret, else the endpoint's
  BUCKET_* then AWS_*. Endpoint: outputs.s3.endpoint_url, else s3Config.endpointUrl, else the
  endpoint's BUCKET_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. Region: outputs.s3.region,
  else AWS_REGION / AWS_DEFAULT_REGION.
- The Hub when the job has outputs.hub (token: credentials.hf_token, else HF_TOKEN).
- The local store BASE_VOLUME/store/<run_id>/ when neither is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas.config import TrainingConfig
from schemas.job import JobInput, PublishKind, S3Config
from schemas.secrets import Redactor
from worker.publish.hub import HubTarget
from worker.publish.local import store_root
from worker.publish.s3 import S3Location, S3Settings
from worker.publish.transfer import TransferSettings
from worker.publish.vllm_check import max_lora_rank


@dataclass(frozen=True)
class S3Target:
    root: S3Location  # the run's root: s3://bucket/prefix/<run_id>
    settings: S3Settings  # endpoint, region and the key pair (never shown: repr=False there)


@dataclass(frozen=True, kw_only=True)
class PublishPlan:
    """What a job publishes, where, and with which credentials (repr shows no secret)."""

    run_id: str
    kinds: frozenset[PublishKind]  # job.publish
    config: TrainingConfig = field(repr=False)  # for the model card and the main kind (a URL in it may be signed)
    s3: S3Target | None
    hub: HubTarget | None
    local: Path | None  # BASE_VOLUME/store/<run_id> when it is the target
    transfer: TransferSettings
    max_lora_rank: int  # the vLLM check's limit (FTW_MAX_LORA_RANK)
    redactor: Redactor = field(repr=False, compare=False)  # the job's masker, for the model card

    @property
    def main_kind(self) -> str:
        """`adapter` for a LoRA/QLoRA run, `model` for a full fine-tune: the run folder's main output."""
        return "adapter" if self.config.adapter is not None else "model"

    @property
    def keep_checkpoints(self) -> int | None:
        """Remote checkpoints kept: save_total_limit when they were asked for; else the newest one,
        which is resume insurance only."""
        return self.config.save_total_limit if "checkpoints" in self.kinds else 1

    @classmethod
    def resolve(
        cls, job: JobInput, s3_config: S3Config | None, env: Mapping[str, str], redactor: Redactor
    ) -> PublishPlan:
        """The plan of a validated job (no I/O: a link in the store is refused when it is written)."""
        outputs = job.outputs
        hub = HubTarget.resolve(outputs.hub, job.credentials, env) if outputs.hub is not None else None
        s3 = _s3_target(job, s3_config, env)
        return cls(
            run_id=job.run_id,
            kinds=frozenset(job.publish),
            config=job.config,
            s3=s3,
            hub=hub,
            local=store_root(env) / job.run_id if s3 is None and hub is None else None,
            transfer=TransferSettings.from_env(env),
            max_lora_rank=max_lora_rank(env),
            redactor=redactor,
        )


def _s3_target(job: JobInput, s3_config: S3Config | None, env: Mapping[str, str]) -> S3Target | None:
    bucket_from_runpod = (s3_config.bucket_name if s3_config else None) or env.get("BUCKET_NAME")
    if job.outputs.s3 is not None:
        root = S3Location(job.outputs.s3.bucket, job.outputs.s3.prefix)
    elif bucket_from_runpod:
        root = S3Location(bucket_from_runpod, (env.get("FTW_S3_PREFIX") or "").strip("/"))
    else:
        return None
    return S3Target(root.child(job.run_id), _s3_settings(job, s3_config, env))


def _s3_settings(job: JobInput, s3_config: S3Config | None, env: Mapping[str, str]) -> S3Settings:
    endpoint = S3Settings.from_env(env)
    creds = job.credentials
    pairs = [
        (creds.aws_access_key_id, creds.aws_secret_access_key, creds.aws_session_token),
        (s3_config.access_id, s3_config.access_secret, None) if s3_config else (None, None, None),
    ]
    key, secret, token = endpoint.access_key, endpoint.secret_key, endpoint.session_token
    for k, s, t in pairs:
        if k is not None and s is not None and k.get_secret_value() and s.get_secret_value():
            key, secret = k.get_secret_value(), s.get_secret_value()
            token = t.get_secret_value() or None if t is not None else None
            break
    outputs_s3 = job.outputs.s3
    return S3Settings(
        endpoint_url=(outputs_s3.endpoint_url if outputs_s3 else None)
        or (s3_config.endpoint_url if s3_config else None)
        or endpoint.endpoint_url,
        region=(outputs_s3.region if outputs_s3 else None) or endpoint.region,
        access_key=key,
        secret_key=secret,
        session_token=token,
    )

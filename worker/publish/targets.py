"""Where a job's artifacts go, resolved once from the job and the endpoint's environment.

- S3 when the job has outputs.s3, or when the endpoint (or the job's RunPod s3Config, which the
  orchestrator puts into BUCKET_*) names a bucket in BUCKET_NAME (prefix: FTW_S3_PREFIX).
  Artifacts of a run live under s3://bucket/prefix/<run_id>/.
- The Hub when the job has outputs.hub.
- The local store BASE_VOLUME/store/<run_id>/ when neither is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.publish.hub import HubTarget
from worker.publish.local import store_run_dir
from worker.publish.s3 import S3Location, S3Settings
from worker.publish.transfer import TransferSettings


@dataclass(frozen=True)
class Targets:
    run_id: str
    s3: S3Location | None  # the run's root: s3://bucket/prefix/<run_id>
    s3_settings: S3Settings
    hub: HubTarget | None
    local: Path | None  # BASE_VOLUME/store/<run_id> when it is the target
    transfer: TransferSettings

    @classmethod
    def for_job(cls, job: Any, env: Mapping[str, str]) -> Targets:
        outputs = job.outputs
        s3 = None
        if outputs.s3 is not None:
            s3 = S3Location(outputs.s3.bucket, outputs.s3.prefix).child(job.run_id)
        elif env.get("BUCKET_NAME"):
            s3 = S3Location(env["BUCKET_NAME"], (env.get("FTW_S3_PREFIX") or "").strip("/")).child(job.run_id)
        hub = HubTarget.resolve(outputs.hub, job.credentials, env) if outputs.hub is not None else None
        local = store_run_dir(env, job.run_id) if s3 is None and hub is None else None
        return cls(
            job.run_id,
            s3,
            S3Settings.resolve(env, outputs.s3, job.credentials),
            hub,
            local,
            TransferSettings.from_env(env),
        )

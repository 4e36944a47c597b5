"""Publishing and pulling artifacts: S3 (and S3-compatible), the Hugging Face Hub, the local store.

    from worker.publish import PublishPlan, publish_run, start_uploader, restore_checkpoint, pull

- `PublishPlan.resolve(job, s3_config, env, redactor)`  targets and credentials, once per job (targets.py)
- `publish_run(run_dir, plan) -> list[dict]`            the publish stage (run.py)
- `start_uploader(run_dir, plan).stop()`                checkpoints to S3 while training runs
- `restore_checkpoint(run_dir, plan) -> Path|None`      the newest remote checkpoint back (resume)
- `pull(source, env, dest=None, kind="adapter")`        a verified, cached copy (pull.py; `ftw pull`)

A published prefix is complete only when its manifest.json (sha256 per file) exists, written last.
Nothing here imports torch; boto3 and huggingface_hub are imported when first used.
"""

from __future__ import annotations

from worker.publish.checkpoints import CheckpointUploader, restore_checkpoint, start_uploader
from worker.publish.pull import Pulled, pull
from worker.publish.run import publish_run
from worker.publish.targets import PublishPlan

__all__ = [
    "CheckpointUploader",
    "PublishPlan",
    "Pulled",
    "publish_run",
    "pull",
    "restore_checkpoint",
    "start_uploader",
]

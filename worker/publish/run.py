"""`publish_run`: the publish stage of a job — a run folder in, artifact records out.

    artifacts = publish_run(run_dir, job, env)        # list of dicts, or PublishError

What is published (job.publish): `adapter` (RUN_DIR/adapter; RUN_DIR/model for a full fine-tune,
kind "model"), `merged` (RUN_DIR/merged), `checkpoints` (every complete checkpoint; S3 only, the
local volume already holds them — the training-time uploader sends them to S3 as resume insurance
in any case, and they are removed from the bucket after a successful publish that did not ask for
them), and always `logs` (RUN_DIR/logs, summary.json, loss.png,
config.json) next to them on S3 and in the local store. Targets: see targets.py.

Each record: {kind, target: s3|hub|local, uri, sha256_manifest, files, bytes} plus `revision` and
`commit` for the Hub and `warnings` (vLLM compatibility) for an adapter. Every artifact is complete
(manifest written last) or absent; when one fails, the PublishError's details list what was
already published, so nothing done is lost and a resubmitted run_id publishes again.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.errors import PublishError
from worker.publish.checkpoints import CheckpointUploader
from worker.publish.hub import publish_hub
from worker.publish.local import publish_local, store_uri
from worker.publish.s3 import make_client, upload_folder
from worker.publish.targets import Targets
from worker.publish.transfer import ProgressSink
from worker.publish.vllm_check import check_adapter

LOG_FILES = ("summary.json", "loss.png", "config.json")


def _main_folder(run_dir: Path, job: Any) -> tuple[str, Path]:
    if job.config.adapter is not None:
        return "adapter", run_dir / "adapter"
    return "model", run_dir / "model"


def _require(folder: Path, kind: str) -> Path:
    if not folder.is_dir() or not any(folder.iterdir()):
        raise PublishError(
            f"nothing to publish as {kind}: {folder.name}/ is missing or empty in the run folder",
            f"training did not produce {folder.name}/; check the train stage's log"
            + ("; for merged, set merge_lora: true" if kind == "merged" else ""),
        )
    return folder


def _stage_logs(run_dir: Path) -> Path | None:
    """A temp folder with the run's logs and summary (None when the run has none)."""
    stage = run_dir / ".tmp-publish-logs"
    shutil.rmtree(stage, ignore_errors=True)
    logs = run_dir / "logs"
    if logs.is_dir():
        shutil.copytree(logs, stage / "logs", symlinks=False)
    for name in LOG_FILES:
        if (run_dir / name).is_file():
            stage.mkdir(exist_ok=True)
            shutil.copy2(run_dir / name, stage / name)
    return stage if stage.is_dir() else None


def _secrets(job: Any, env: Mapping[str, str]) -> list[str]:
    from schemas.secrets import env_secrets

    return job.credentials.secrets() + env_secrets(env)


def publish_run(
    run_dir: Path,
    job: Any,
    env: Mapping[str, str],
    uploader: CheckpointUploader | None = None,
    *,
    progress: ProgressSink | None = None,
) -> list[dict[str, Any]]:
    """Publish the run's artifacts to the job's targets; PublishError (with what got published) on failure.
    `progress` receives {stage: publish, what, bytes_done, bytes_total, bytes_per_s, eta_s} events, and
    {stage: publish, message} as each step begins."""
    run_dir = Path(run_dir)
    targets = Targets.for_job(job, env)
    main_kind, main_dir = _main_folder(run_dir, job)
    folders: list[tuple[str, Path]] = []
    if "adapter" in job.publish:
        folders.append((main_kind, _require(main_dir, main_kind)))
    if "merged" in job.publish:
        folders.append(("merged", _require(run_dir / "merged", "merged")))
    warnings = check_adapter(main_dir, env) if main_kind == "adapter" and "adapter" in job.publish else []
    published: list[dict[str, Any]] = []
    logs = _stage_logs(run_dir)

    def starting(what: str) -> None:  # shown to the caller, whose sink may also end an abandoned publish here
        if progress is not None:
            progress({"stage": "publish", "message": what})

    try:
        if targets.s3 is not None:
            client = make_client(targets.s3_settings, targets.transfer)
            for kind, folder in folders + ([("logs", logs)] if logs else []):
                loc = targets.s3.child(kind)
                manifest = upload_folder(
                    client, folder, loc, targets.transfer, label=f"upload {kind}", progress_sink=progress
                )
                published.append(_record(kind, "s3", loc.uri, manifest))
            if "checkpoints" in job.publish:
                starting("uploading checkpoints")
                uploader = uploader or CheckpointUploader(run_dir, targets, keep_last=job.config.save_total_limit)
                published += uploader.stop()
                if uploader.failed_steps():
                    raise PublishError(
                        f"checkpoint upload failed for step(s) {uploader.failed_steps()}: {uploader.errors[-1]}",
                        "the checkpoints are still in the run folder; resubmit the run_id to upload them",
                    )
            elif uploader is not None:  # they were resume insurance while training ran; not asked for as results
                uploader.stop()
                uploader.discard()
        if targets.hub is not None and folders:
            starting(f"committing to the Hub repo {targets.hub.repo_id}")
            published.append(_to_hub(targets, job, run_dir, dict(folders), env))
        if targets.local is not None:
            starting("copying to the local store")
            for kind, folder in folders + ([("logs", logs)] if logs else []):
                dest = targets.local / kind
                published.append(_record(kind, "local", store_uri(dest), publish_local(folder, dest)))
    except PublishError as e:
        e.stage = e.stage or "publish"
        e.details = {**e.details, "published": published}
        raise
    finally:
        if logs is not None:
            shutil.rmtree(logs, ignore_errors=True)
    for record in published:
        if record["kind"] == "adapter" and warnings:
            record["warnings"] = record.get("warnings", []) + warnings
    return published


def _to_hub(
    targets: Targets, job: Any, run_dir: Path, folders: dict[str, Path], env: Mapping[str, str]
) -> dict[str, Any]:
    """The repo root gets the adapter (or model); `merged/` the merged model — or the root when only it was asked."""
    main_kind = next((k for k in folders if k != "merged"), "merged")
    merged = folders.get("merged") if main_kind != "merged" else None
    return publish_hub(
        targets.hub,
        job.config,
        job.run_id,
        run_dir,
        folders[main_kind],
        main_kind,
        merged,
        _secrets(job, env),
        targets.transfer,
    )


def _record(kind: str, target: str, uri: str, manifest: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "target": target,
        "uri": uri,
        "sha256_manifest": manifest.sha256,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
    }

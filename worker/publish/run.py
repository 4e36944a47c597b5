"""`publish_run`: the publish stage of a job — a run folder in, artifact records out.

    artifacts = publish_run(run_dir, plan)        # list of dicts, or PublishError

What is published (the plan's kinds, from job.publish): `adapter` (RUN_DIR/adapter; RUN_DIR/model for a full fine-tune,
kind "model"), `merged` (RUN_DIR/merged), `checkpoints` (every complete checkpoint; S3 only, the
local volume already holds them — the training-time uploader sends them to S3 as resume insurance
in any case, and they are removed from the bucket after a successful publish that did not ask for
them), and always `logs` (RUN_DIR/logs, summary.json, loss.png,
config.json) next to them on S3 and in the local store. Targets and credentials: the job's one
PublishPlan (targets.py).

Each record: {kind, target: s3|hub|local, uri, sha256_manifest, files, bytes} plus `revision` and
`commit` for the Hub and `warnings` (vLLM compatibility) for an adapter. Every artifact is complete
(manifest written last) or absent; when one fails, the PublishError's details list what was
already published, so nothing done is lost and a resubmitted run_id publishes again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from worker.errors import PublishError
from worker.publish.checkpoints import CheckpointUploader
from worker.publish.hub import HubTarget, publish_hub
from worker.publish.local import checked_store_dir, publish_local, store_uri
from worker.publish.manifest import Manifest
from worker.publish.s3 import make_client, upload_folder
from worker.publish.targets import PublishPlan
from worker.publish.transfer import ProgressSink
from worker.publish.vllm_check import check_adapter

LOG_FILES = ("summary.json", "loss.png", "config.json")


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


def publish_run(
    run_dir: Path,
    plan: PublishPlan,
    uploader: CheckpointUploader | None = None,
    *,
    progress: ProgressSink | None = None,
) -> list[dict[str, Any]]:
    """Publish the run's artifacts to the job's targets; PublishError (with what got published) on failure.
    `progress` receives {stage: publish, what, bytes_done, bytes_total, bytes_per_s, eta_s} events, and
    {stage: publish, message} as each step begins."""
    run_dir = Path(run_dir)
    main_kind = plan.main_kind
    main_dir = run_dir / main_kind
    folders: list[tuple[str, Path]] = []
    if "adapter" in plan.kinds:
        folders.append((main_kind, _require(main_dir, main_kind)))
    if "merged" in plan.kinds:
        folders.append(("merged", _require(run_dir / "merged", "merged")))
    warnings = check_adapter(main_dir, plan.max_lora_rank) if main_kind == "adapter" and "adapter" in plan.kinds else []
    published: list[dict[str, Any]] = []
    logs = _stage_logs(run_dir)

    def starting(what: str) -> None:  # shown to the caller, whose sink may also end an abandoned publish here
        if progress is not None:
            progress({"stage": "publish", "message": what})

    try:
        if plan.s3 is not None:
            client = make_client(plan.s3.settings, plan.transfer)
            for kind, folder in folders + ([("logs", logs)] if logs else []):
                loc = plan.s3.root.child(kind)
                manifest = upload_folder(
                    client, folder, loc, plan.transfer, label=f"upload {kind}", progress_sink=progress
                )
                published.append(_record(kind, "s3", loc.uri, manifest))
            if "checkpoints" in plan.kinds:
                starting("uploading checkpoints")
                uploader = uploader or CheckpointUploader(run_dir, plan)
                published += uploader.stop()
                if uploader.failed_steps():
                    raise PublishError(
                        f"checkpoint upload failed for step(s) {uploader.failed_steps()}: {uploader.errors[-1]}",
                        "the checkpoints are still in the run folder; resubmit the run_id to upload them",
                    )
            elif uploader is not None:  # they were resume insurance while training ran; not asked for as results
                uploader.stop()
                uploader.discard()
        if plan.hub is not None and folders:
            starting(f"committing to the Hub repo {plan.hub.repo_id}")
            published.append(_to_hub(plan, plan.hub, run_dir, dict(folders)))
        if plan.local is not None:
            starting("copying to the local store")
            store = checked_store_dir(plan.local)
            for kind, folder in folders + ([("logs", logs)] if logs else []):
                dest = store / kind
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


def _to_hub(plan: PublishPlan, hub: HubTarget, run_dir: Path, folders: dict[str, Path]) -> dict[str, Any]:
    """The repo root gets the adapter (or model); `merged/` the merged model — or the root when only it was asked."""
    main_kind = next((k for k in folders if k != "merged"), "merged")
    merged = folders.get("merged") if main_kind != "merged" else None
    return publish_hub(
        hub, plan.config, plan.run_id, run_dir, folders[main_kind], main_kind, merged, plan.redactor, plan.transfer
    )


def _record(kind: str, target: str, uri: str, manifest: Manifest) -> dict[str, Any]:
    return {
        "kind": kind,
        "target": target,
        "uri": uri,
        "sha256_manifest": manifest.sha256,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
    }

"""Checkpoints to S3 while training runs, and back when the volume is gone.

`CheckpointUploader` is a thread of the orchestrator (no torch here): every `interval_s` it looks
at RUN_DIR/checkpoints/ for complete checkpoints (the train contract: renamed into
`checkpoint-<step>` and holding ftw_state.json), uploads each new one once to
s3://…/<run_id>/checkpoints/checkpoint-<step>/ with its manifest last, and then removes remote
checkpoints beyond save_total_limit (oldest first, manifest first). A checkpoint rotated away by
the trainer mid-upload is skipped — it never gets a manifest. One already in the bucket with the
same manifest (a resumed run) is not uploaded again. It runs whenever the job has an S3 target:
the uploads are resume insurance; `publish_run` removes them after success unless the job asked
for `checkpoints`.

`start_uploader(run_dir, plan)` and `restore_checkpoint(run_dir, plan)` are what the orchestrator
calls, with the job's one PublishPlan (targets.py); `restore_checkpoint` brings the newest complete
remote checkpoint into RUN_DIR/checkpoints when it is newer than any local one, through a temp
folder verified against its manifest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from worker.errors import PublishError
from worker.publish.manifest import Manifest
from worker.publish.s3 import (
    S3Location,
    delete_prefix,
    download_folder,
    list_children,
    make_client,
    read_remote_manifest,
    upload_folder,
)
from worker.publish.targets import PublishPlan, S3Target
from worker.publish.transfer import TransferSettings

log = logging.getLogger("ftw.publish")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "ftw_state.json"
GIVE_UP_AFTER = 3  # failed rounds per checkpoint before the uploader stops trying it


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete local checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    out = []
    for path in root.iterdir() if root.is_dir() else []:
        m = CHECKPOINT.match(path.name)
        if m and path.is_dir() and (path / STATE_FILE).is_file():
            out.append((int(m[1]), path))
    return sorted(out)


def remote_checkpoint_steps(client: Any, root: S3Location, transfer: TransferSettings) -> list[int]:
    return sorted(
        int(m[1])
        for name in list_children(client, root.child("checkpoints"), transfer)
        if (m := CHECKPOINT.match(name))
    )


class CheckpointUploader:
    """Uploads each new complete checkpoint once, in a background thread (a no-op without S3)."""

    def __init__(self, run_dir: Path, plan: PublishPlan, interval_s: float = 10.0):
        self.run_dir, self.plan, self.interval_s = Path(run_dir), plan, interval_s
        self.s3: S3Target | None = plan.s3
        self.transfer, self.keep_last = plan.transfer, plan.keep_checkpoints
        self.artifacts: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._done: set[int] = set()
        self._failures: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._client = make_client(self.s3.settings, self.transfer) if self.s3 is not None else None

    def start(self) -> CheckpointUploader:
        if self._client is not None and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ftw-checkpoint-uploader", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        """Stop the thread, upload what is still new, and return every checkpoint artifact."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sweep()
        return list(self.artifacts)

    def failed_steps(self) -> list[int]:
        """Complete checkpoints that could not be uploaded (not counting tries that later succeeded)."""
        return sorted(s for s in self._failures if s not in self._done)

    def discard(self) -> None:
        """Remove from the bucket the checkpoints this uploader put there (best effort: housekeeping)."""
        for record in self.artifacts:
            try:
                delete_prefix(self._client, S3Location.parse(record["uri"]), self.transfer)
            except Exception as e:
                log.warning("could not remove %s: %s", record["uri"], e)
        self.artifacts = []

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sweep()

    def sweep(self) -> None:
        """Upload every complete checkpoint not uploaded yet (safe to call from any thread)."""
        if self._client is None or self.s3 is None:
            return
        with self._lock:
            for step, folder in complete_checkpoints(self.run_dir):
                if step in self._done or self._failures.get(step, 0) >= GIVE_UP_AFTER:
                    continue
                self._upload(self.s3.root, step, folder)

    def _upload(self, root: S3Location, step: int, folder: Path) -> None:
        loc = root.child("checkpoints", folder.name)
        try:
            local = Manifest.of_folder(folder)
            remote = read_remote_manifest(self._client, loc, self.transfer)
            manifest = (
                local
                if remote is not None and remote.sha256 == local.sha256
                else upload_folder(self._client, folder, loc, self.transfer, label=f"upload {folder.name}")
            )
            if not folder.is_dir():
                raise FileNotFoundError(folder)
        except FileNotFoundError:
            log.info("%s was rotated away before its upload finished; skipped", folder.name)
            self._done.add(step)
            return
        except PublishError as e:
            self._failures[step] = self._failures.get(step, 0) + 1
            self.errors.append(f"{folder.name}: {e.message}")
            log.warning(
                "checkpoint upload failed (%s); %s",
                e.message,
                "will retry" if self._failures[step] < GIVE_UP_AFTER else "giving up",
            )
            return
        self._done.add(step)
        self.artifacts.append(
            {
                "kind": "checkpoints",
                "target": "s3",
                "uri": loc.uri,
                "step": step,
                "sha256_manifest": manifest.sha256,
                "files": len(manifest.files),
                "bytes": manifest.total_bytes,
            }
        )
        self._rotate(root, step)

    def _rotate(self, root: S3Location, uploaded: int) -> None:
        """Keep the newest `keep_last` remote checkpoints up to `uploaded`, the one just completed (a
        higher step there may be an unfinished upload, which must not count as one of those kept)."""
        if not self.keep_last:
            return
        transfer = self.transfer
        steps = [s for s in remote_checkpoint_steps(self._client, root, transfer) if s <= uploaded]
        for step in steps[: -self.keep_last]:
            try:
                delete_prefix(self._client, root.child("checkpoints", f"checkpoint-{step}"), transfer)
                self.artifacts = [a for a in self.artifacts if a.get("step") != step]
            except Exception as e:  # rotation is housekeeping: the newest checkpoints are safe either way
                log.warning("could not remove old remote checkpoint-%d: %s", step, e)


def start_uploader(run_dir: Path, plan: PublishPlan, interval_s: float = 10.0) -> CheckpointUploader:
    """The running uploader of a job (a no-op when the plan has no S3 target); `stop()` it after training."""
    return CheckpointUploader(run_dir, plan, interval_s=interval_s).start()


def restore_checkpoint(run_dir: Path, plan: PublishPlan) -> Path | None:
    """Download the newest complete remote checkpoint when it is newer than the local ones; its folder or None."""
    run_dir = Path(run_dir)
    if plan.s3 is None:
        return None
    transfer = plan.transfer
    client = make_client(plan.s3.settings, transfer)
    local = complete_checkpoints(run_dir)
    newest_local = local[-1][0] if local else -1
    for step in reversed(remote_checkpoint_steps(client, plan.s3.root, transfer)):
        if step <= newest_local:
            return None
        loc = plan.s3.root.child("checkpoints", f"checkpoint-{step}")
        manifest = read_remote_manifest(client, loc, transfer)
        if manifest is None:
            continue  # an upload that never finished: not a checkpoint
        root = run_dir / "checkpoints"
        tmp = root / f".tmp-checkpoint-{step}-restore-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            download_folder(client, loc, tmp, transfer, manifest)
            final = root / f"checkpoint-{step}"
            shutil.rmtree(final, ignore_errors=True)  # an incomplete local copy (no ftw_state.json)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("restored checkpoint-%d from %s", step, loc.uri)
        return final
    return None

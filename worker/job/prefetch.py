"""The base model's weights, fetched from the Hub while the data is prepared.

The train child used to download a Hub model only once preprocessing was done: on a job's first run of
a model, the user paid for the two one after the other (an 8B model is 16 GB). Once the checks pass, the
job starts this child beside the preprocess stage. It lists the repository at the job's revision and
downloads what transformers loads for training (the config files and the weights of one format,
safetensors where the repository has them) into the Hugging Face cache the train child reads. The
job waits for it before the train stage starts. If it fails, the job only logs that: the train child
downloads what is missing and reports its own errors. It is killed with the job.

    python -m worker.job.prefetch REPO_ID [--revision REV]      (HF_TOKEN, HF_ENDPOINT, HF_HOME: the job's)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.paths import is_local, is_remote
from worker.job.side_child import SideChild
from worker.job.updates import ProgressSink, stage_update

if TYPE_CHECKING:  # the child imports this module: it needs huggingface_hub, not pydantic's config
    from schemas.config import TrainingConfig
    from schemas.secrets import Redactor
    from worker.job.supervisor import StopSignal

log = logging.getLogger("ftw.job")
WAITING = "waiting for the base model's download"  # the progress message while the train stage waits
PROGRESS = b"bytes "  # the child's progress lines: "bytes DONE TOTAL"
SWITCH = "FTW_MODEL_PREFETCH"  # "0": the train child downloads the model itself, after preprocessing


# the weights files transformers writes and reads: one file or numbered shards, safetensors or PyTorch's
WEIGHTS = re.compile(r"(?:model|pytorch_model)(?:-\d+-of-\d+)?\.(safetensors|bin)")


def files_to_fetch(names: list[str]) -> list[str]:
    """The repository's top-level files transformers reads to load the model: its JSON files and the
    weights of one format (safetensors if any, else PyTorch .bin), by transformers' own file names where
    the repository has them (a Mistral repository's consolidated.safetensors is another copy); never
    subfolders."""
    top = [n for n in names if "/" not in n]
    for ext in ("safetensors", "bin"):
        weights = [n for n in top if (m := WEIGHTS.fullmatch(n)) and m.group(1) == ext]
        weights = weights or [n for n in top if n.endswith(f".{ext}")]
        if weights:
            break
    return sorted([n for n in top if n.endswith(".json")] + weights)


class ModelPrefetch(SideChild):
    """The running download child of one job."""

    @classmethod
    def start(cls, cfg: TrainingConfig, env: Mapping[str, str], log: Path, redactor: Redactor) -> ModelPrefetch | None:
        """The child for a Hub base model; None for a local or remote one, offline, or switched off."""
        name = cfg.base_model
        offline = (env.get("HF_HUB_OFFLINE") or "") in ("1", "true")
        if is_local(name) or is_remote(name) or offline or env.get(SWITCH) == "0":
            return None
        argv = [sys.executable, "-m", "worker.job.prefetch", name]
        if cfg.revision_of_model:
            argv += ["--revision", cfg.revision_of_model]
        # a fresh interpreter, not the stage template: the download starts before the template's imports end
        proc, output = cls.launch(argv, {**env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})  # its "bytes" lines say how far
        return cls(proc, output, log, redactor, noise=PROGRESS)

    @classmethod
    @contextlib.contextmanager
    def beside(
        cls, cfg: TrainingConfig, env: Mapping[str, str], logs: Path, redactor: Redactor, wanted: bool
    ) -> Iterator[ModelPrefetch | None]:
        """The download child while the block runs (None where there is nothing to fetch); killed at its end."""
        prefetch = cls.start(cfg, env, logs / "prefetch.log", redactor) if wanted else None
        try:
            yield prefetch
        finally:
            if prefetch is not None:
                prefetch.close()

    def wait(self, stop: StopSignal, progress: ProgressSink, run_id: str) -> bool:
        """Until the download ends (a cancel raises through `stop`), showing it to the user meanwhile (a
        message, then the bytes so far; `progress` throttles them). Whether it fetched everything."""
        message = WAITING
        while self.proc.poll() is None:
            done, total = self.bytes_so_far()
            counted = {"bytes_done": done, "bytes_total": total} if done is not None else {}
            progress(stage_update(run_id, "train", message, what="base model", **counted))
            message = ""
            if stop.wait(0.5):
                stop.check("while the base model was downloading")
        self.keep_output()
        if self.proc.returncode != 0:
            log.warning("%s; the train stage downloads what is missing", self.last_line())
        return self.proc.returncode == 0

    def bytes_so_far(self) -> tuple[int | None, int | None]:
        """(done, total) of the child's newest progress line."""
        for line in reversed(self.output):
            if line.startswith(PROGRESS):
                done, total = line[len(PROGRESS) :].split()
                return int(done), int(total)
        return None, None


def report_bytes(repo_id: str, total: int) -> None:
    """Every half second, "bytes DONE TOTAL": what the repository's blobs in the HF cache hold so far
    (partial downloads included), for the job's progress while the train stage waits."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    done = 0
    while True:
        counted = 0
        for blob in blobs.glob("*") if blobs.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):  # an .incomplete file renamed meanwhile
                counted += blob.stat().st_size
        done = max(done, min(counted, total))  # never backwards: a file between two names is missed once
        print(f"{PROGRESS.decode()}{done} {total}", flush=True)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="download a Hub model's config and weights into the HF cache")
    parser.add_argument("repo_id")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    from huggingface_hub import HfApi, snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    started = time.monotonic()
    try:
        info = HfApi(token=token).model_info(args.repo_id, revision=args.revision, files_metadata=True)
        names = files_to_fetch([s.rfilename for s in info.siblings or []])
        total = sum(s.size or 0 for s in info.siblings or [] if s.rfilename in names)
        threading.Thread(target=report_bytes, args=(args.repo_id, total), daemon=True).start()
        snapshot_download(args.repo_id, revision=args.revision, allow_patterns=names, token=token)
    except Exception as e:  # the train child meets the same problem and reports it in full
        print(f"prefetch of {args.repo_id} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return 1
    took = time.monotonic() - started
    print(f"prefetched {len(names)} files of {args.repo_id} ({total / 2**20:.1f} MiB) in {took:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

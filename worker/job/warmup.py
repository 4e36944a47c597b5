"""The kernel warm-up beside the preprocess stage: the job's kernels compile while its data is prepared.

worker/train/warmup.py is the child (a one-layer copy of the job's model, a forward and backward per
micro-batch); this is the orchestrator's side. It starts once the checks pass, forked from the stage template like the
stages, wherever the job's first step would compile kernels: on a GPU (ftw's Triton kernels, unless
`use_kernels: false`) or under `torch_compile`. It has preprocessing and the base model's download
(worker/job/prefetch.py: minutes on a job's first run of a Hub model), then the train stage's start-up and
model loading (tens of seconds for an 8B model read from the volume) to do its work in. On a GPU it records its
kernels in a pass that compiles none and compiles them side by side in worker processes (ftw_kernels.precompile).
When the train child's model is ready, that child waits out a warm-up still recording or compiling side by side
(a pass with no compile, then the compiles spread over the machine's cores: sooner than it would compile them
itself) and stops one in any other phase (worker/train/warmup_lock.py), before its first step; the orchestrator
reaps it at the first step (worker/job/pipeline.py). It never shares the GPU with a step. Whatever it compiled by
then is in the caches on the volume; the train stage compiles the rest. Its output is in logs/warmup.log.
`FTW_KERNEL_WARMUP=0` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.paths import is_remote
from worker.job.side_child import SideChild
from worker.train import warmup_lock

if TYPE_CHECKING:
    from schemas.config import TrainingConfig
    from schemas.secrets import Redactor
    from worker.job.template import StageTemplate

log = logging.getLogger("ftw.job")
SWITCH = "FTW_KERNEL_WARMUP"


def compiles_kernels(cfg: TrainingConfig, gpus: int) -> bool:
    """Whether the job's first step compiles kernels on this machine: ftw's Triton kernels on a GPU, or
    torch.compile (`torch_compile: auto` compiles on a GPU only)."""
    return cfg.compiles_model(gpus > 0) or (gpus > 0 and cfg.use_kernels is not False)


def warmup_argv(cfg: TrainingConfig, config_path: Path, env: Mapping[str, str], gpus: int) -> list[str] | None:
    """The warm-up's command, or None where the first step compiles nothing, the base model's config is not at
    hand before the train stage fetches it (a remote base model), or it is switched off."""
    model = cfg.base_model_config or cfg.base_model
    if env.get(SWITCH) == "0" or not compiles_kernels(cfg, gpus) or is_remote(model):
        return None
    return [sys.executable, "-m", "worker.train.warmup", str(config_path)]


class KernelWarmup:
    """The warm-up child of one job, launched from a thread: forking from the stage template waits until
    the template's imports are done, which the orchestrator does not."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        template: StageTemplate | None,
        log: Path,
        redactor: Redactor,
        run_dir: Path,
    ):
        self.run_dir = run_dir  # the run whose lock it holds while it runs (worker/train/warmup_lock.py)
        self.child: SideChild | None = None
        self.stopped = False
        self.lock = threading.Lock()
        self.launcher = threading.Thread(
            target=self._launch, args=(argv, env, template, log, redactor), name="kernel-warmup", daemon=True
        )
        self.launcher.start()

    @classmethod
    @contextlib.contextmanager
    def beside(
        cls,
        cfg: TrainingConfig,
        config_path: Path,
        env: Mapping[str, str],
        gpus: int,
        template: StageTemplate | None,
        logs: Path,
        redactor: Redactor,
        wanted: bool,
    ) -> Iterator[KernelWarmup | None]:
        """The warm-up while the block runs (preprocessing, the model's download, the train stage until its first
        step); stopped at its end if it still runs."""
        argv = warmup_argv(cfg, config_path, env, gpus) if wanted else None
        warmup = None if argv is None else cls(argv, env, template, logs / "warmup.log", redactor, config_path.parent)
        try:
            yield warmup
        finally:
            if warmup is not None:
                warmup.stop()

    def _launch(
        self,
        argv: list[str],
        env: Mapping[str, str],
        template: StageTemplate | None,
        log_path: Path,
        redactor: Redactor,
    ) -> None:
        try:
            proc, output = SideChild.launch(argv, env, template)
        except OSError as e:
            log.warning("kernel warm-up not started: %s", e)
            return
        child = SideChild(proc, output, log_path, redactor)
        with self.lock:
            self.child = child
            stopped = self.stopped
        if stopped:  # stopped while it was being launched
            child.close()
            warmup_lock.remove(self.run_dir)
        elif isinstance(proc, subprocess.Popen):
            proc.wait()  # its parent-death signal fires when the thread that started it ends: this one waits

    def stop(self, when: str = "the train stage ended") -> None:
        """Stop it if it still runs (what it compiled so far stays cached), and log how it ended, once."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            child = self.child
        if child is None:
            log.info("kernel warm-up stopped before it started")
            return
        running = child.running()
        child.close()
        warmup_lock.remove(self.run_dir)  # released with the process: what is left is a file
        if running or child.proc.returncode == -signal.SIGKILL:  # killed here, or by the train child (warmup_lock)
            log.info("kernel warm-up stopped when %s; the train stage compiles what it had not", when)
        elif child.proc.returncode == 0:
            log.info("%s", child.last_line())
        else:
            log.warning("%s; the train stage compiles its kernels itself", child.last_line())

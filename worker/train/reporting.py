"""Where progress goes: JSON-line events (worker.events), a terminal bar, and experiment trackers.

Only rank 0 reports. Trackers are optional imports, used only when the config turns them on
(use_wandb / wandb_project, use_mlflow / mlflow_tracking_uri, use_tensorboard); a tracker that is
configured but not installed is refused before preprocessing (worker/checks/machine.py), not a silent no-op.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.config import TrainingConfig
from worker.events import emit
from worker.train.gpu_clocks import GpuClocks, gpu_id

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ftw.train")


class Trackers:
    def __init__(self, cfg: TrainingConfig, run_dir: Path, names: list[str]):
        self.sinks: list[Any] = []
        config = cfg.model_dump(mode="json")
        if "wandb" in names:
            import wandb

            self.sinks.append(
                (
                    "wandb",
                    wandb.init(
                        project=cfg.wandb_project,
                        entity=cfg.wandb_entity,
                        name=cfg.wandb_name,
                        id=cfg.wandb_run_id,
                        mode=cfg.wandb_mode,
                        config=config,
                        dir=str(run_dir),
                        resume="allow",
                    ),
                )
            )
        if "mlflow" in names:
            import mlflow

            if cfg.mlflow_tracking_uri:
                mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
            if cfg.mlflow_experiment_name:
                mlflow.set_experiment(cfg.mlflow_experiment_name)
            mlflow.start_run(run_name=cfg.mlflow_run_name)
            self.sinks.append(("mlflow", mlflow))
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.sinks.append(("tensorboard", SummaryWriter(str(run_dir / "tensorboard"))))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for kind, sink in self.sinks:
            if kind == "wandb":
                sink.log(metrics, step=step)
            elif kind == "mlflow":
                sink.log_metrics(metrics, step=step)
            else:
                for key, value in metrics.items():
                    sink.add_scalar(key, value, step)

    def close(self) -> None:
        for kind, sink in self.sinks:
            {"wandb": lambda s: s.finish(), "mlflow": lambda s: s.end_run(), "tensorboard": lambda s: s.close()}[kind](
                sink
            )


@dataclass
class Pace:
    """Tokens a second and the time left, measured from the first step this run recorded: the first step's own
    time (kernel compiles and autotuning, cuDNN's plan search, the allocator's first blocks) would otherwise weigh
    on both for most of a run, showing a slow rate and a late ETA long after the steps are fast. Until a second
    step is recorded, both are measured from the loop's start. On CUDA the time since that first step is the
    steps' own on the GPU's clock (their `step_ms`): the host records a step a step or two after it ran, and the
    last one on time, which would make a short run's rate read high."""

    started: float  # the loop's start (time.monotonic)
    steps_before: int  # steps done when it started (a resumed run's checkpoint)
    total: int
    origin: tuple[float, int, int] | None = None  # (time, steps done, tokens) at the first recorded step
    gpu_s: float | None = 0.0  # the GPU time of the steps since then; None once one came without it
    steps_rate: float | None = None  # tokens a second since then, once a second step is recorded

    def at(self, step: int, tokens: int, now: float, step_ms: float | None = None) -> tuple[float, float | None]:
        """(tokens a second, seconds left) with `step` steps and `tokens` tokens done by this run at `now`;
        `step_ms`: this step's time on the GPU's clock, where there is one."""
        if self.origin is None:
            self.origin = (now, step, tokens)
        elif self.gpu_s is not None:
            self.gpu_s = None if step_ms is None else self.gpu_s + step_ms / 1e3
        since, first, first_tokens = self.origin
        if step > first and now > since:
            elapsed, steps, tokens = self.gpu_s or now - since, step - first, tokens - first_tokens
            self.steps_rate = tokens / elapsed
        else:
            elapsed, steps = max(now - self.started, 1e-9), step - self.steps_before
        left = elapsed / steps * (self.total - step) if steps > 0 else None
        return tokens / elapsed, left


class Progress:
    """Step reports for the orchestrator (events), a person (tqdm on a terminal) and trackers; with them, the
    clock and power of the GPU the steps run on (worker/train/gpu_clocks.py), when `device` is one."""

    def __init__(
        self,
        cfg: TrainingConfig,
        run_dir: Path,
        total_steps: int,
        first_step: int,
        enabled: bool,
        device: torch.device | None,
    ):
        self.enabled = enabled
        gpu = gpu_id(device.index or 0) if enabled and device is not None and device.type == "cuda" else None
        self.clocks = GpuClocks(gpu)
        self.clocks.start()
        self.gpu_summary: dict[str, Any] = {}
        self.total = total_steps
        self.every = cfg.logging_steps or 1
        self.pace = Pace(time.monotonic(), first_step, total_steps)
        self.trackers = Trackers(cfg, run_dir, cfg.trackers()) if enabled else None
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def step(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        """`step` recorded, with `tokens` trained by this run so far (this process's share)."""
        if not self.enabled:
            return
        tokens_per_s, eta = self.pace.at(step, tokens, time.monotonic(), metrics.get("step_ms"))
        metrics = {**metrics, "tokens_per_s": tokens_per_s, **self.clocks.latest()}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if step % self.every == 0 or step == self.total:
            emit(
                {
                    "stage": "train",
                    "step": step,
                    "total_steps": self.total,
                    **metrics,
                    "eta_s": None if eta is None else round(eta, 1),
                }
            )
            self.trackers.log({f"train/{k}": v for k, v in metrics.items() if v is not None}, step)
            if self.bar is None:
                log.info(
                    "step %d/%d loss %.4f lr %.3g tokens/s %.0f",
                    step,
                    self.total,
                    metrics["loss"],
                    metrics["lr"],
                    metrics["tokens_per_s"],
                )

    def event(self, **fields: Any) -> None:
        if self.enabled:
            emit({"stage": "train", "total_steps": self.total, **fields})

    def eval(self, step: int, loss: float, metrics: dict[str, float] | None = None) -> None:
        if self.enabled:
            extra = {f"eval_{k}": v for k, v in (metrics or {}).items()}
            emit({"stage": "eval", "step": step, "total_steps": self.total, "eval_loss": loss, **extra})
            self.trackers.log({"eval/loss": loss, **{f"eval/{k}": v for k, v in (metrics or {}).items()}}, step)
            log.info("eval at step %d: loss %.4f", step, loss)

    def close(self) -> None:
        self.clocks.stop()
        self.gpu_summary = self.clocks.summary()
        if self.bar is not None:
            self.bar.close()
        if self.trackers is not None:
            self.trackers.close()


def peak_memory_gib(device: torch.device, setup_peak_bytes: int) -> tuple[float, float | None]:
    """(the process's peak: loading and set-up's, a float8 base converted from bf16 among it, or the steps'; the steps'
    own peak, what a step needs once the model is set up) on CUDA; on the CPU (the process's max RSS, None)."""
    import torch

    if device.type == "cuda":
        steps = torch.cuda.max_memory_allocated(device)
        return max(setup_peak_bytes, steps) / 2**30, steps / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None  # KiB on Linux


OOM_HINT = (
    "lower micro_batch_size (raise gradient_accumulation_steps to keep the batch), set gradient_checkpointing: true, "
    "or use a larger GPU; the run resumes from its last checkpoint"
)


def oom_hint(env: Mapping[str, str]) -> str:
    """What to change after a CUDA out-of-memory error; where the checks gave the run torch's fixed allocator segments
    (worker/checks/gpu.allocator_conf, whose CACHING this is: the stage reads its env, not the checks), also how to go
    back to the expandable ones, which hold no more than the run allocates."""
    fixed = "expandable_segments:False"
    if env.get("PYTORCH_CUDA_ALLOC_CONF") != fixed:
        return OOM_HINT
    return (
        OOM_HINT + f"; this run's allocator kept fixed segments (PYTORCH_CUDA_ALLOC_CONF={fixed}, the checks' choice "
        "for the predicted peak unless the operator set it): PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True on the "
        "worker holds no more than the run allocates"
    )

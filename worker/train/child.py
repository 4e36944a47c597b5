"""The train stage as the orchestrator runs it: one call from config + cache to a finished run folder.

    python -m worker.train RUN_DIR/config.json --run-dir RUN_DIR --data CACHE_DIR
    torchrun --nproc-per-node N -m worker.train ...      (more than one device)

Exit 0 with adapter/ (or model/), merged/ when merge_lora, summary.json and loss.png written;
exit 75 after SIGTERM once a checkpoint of the current step is saved (at once when it comes before the
first step: nothing to save); exit 1 with the error file.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from schemas.config import TrainingConfig
from worker.data.cache import load_prepared
from worker.events import EXIT_OK, EXIT_PREEMPTED, emit
from worker.train import distributed as dist_
from worker.train import outputs, warmup_lock
from worker.train.model import pretrained_source
from worker.train.trainer import Trainer

log = logging.getLogger("ftw.train")


class StoppedInSetup(BaseException):
    """SIGTERM before the first step (model load, a vLLM engine's start): a BaseException so that no
    `except Exception` on the way (an engine start's retries) swallows it."""


def run(cfg: TrainingConfig, run_dir: Path, cache_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    topo = dist_.init(cfg)
    try:
        data = load_prepared(cache_dir)
        trainer = Trainer(cfg, run_dir, data, topo)
        in_setup = [True]

        def on_sigterm(*_: object) -> None:
            trainer.stop_requested = True
            if in_setup[0]:  # nothing trained yet, so nothing to save: stop now, not after a long setup
                raise StoppedInSetup

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            if topo.is_main:
                emit({"stage": "train", "event": "loading", "base_model": cfg.base_model})
            trainer.setup()
            in_setup[0] = False
            if topo.is_main:  # the end of the model's set-up: timings.model_setup_s (worker/job/first_step.py)
                emit({"stage": "train", "event": "ready", "message": "model ready, starting the first step"})
            # the first step has the GPU to itself; a wait for the warm-up's compiles is shown as it starts
            report_warmup(warmup_lock.end_warmup(run_dir, on_wait=waiting_for_warmup if topo.is_main else None))
            code = trainer.train()
        except StoppedInSetup:
            log.warning("SIGTERM during setup (before any step): stopping (exit %d)", EXIT_PREEMPTED)
            emit({"stage": "train", "event": "preempted", "step": 0})
            return EXIT_PREEMPTED
        finally:
            signal.signal(signal.SIGTERM, previous)
        if code != EXIT_OK:
            return code
        finish(trainer)
        dist_.barrier(topo)  # ranks > 0 wait for rank 0's writes: tearing gloo down under a busy peer aborts
        return EXIT_OK
    finally:
        dist_.shutdown()


def waiting_for_warmup(phase: str) -> None:
    message = f"the first step waits for the kernel warm-up's compiles side by side ({phase})"
    emit({"stage": "train", "event": "waiting", "message": message})


def report_warmup(ended: warmup_lock.Ended) -> None:
    if ended.killed:
        log.info("the kernel warm-up was still compiling: stopped in %.3f s, before the first step", ended.seconds)
    elif ended.seconds > 0.001:
        log.info("waited %.2f s for the kernel warm-up (%s), before the first step", ended.seconds, ended.phase)


def finish(trainer: Trainer) -> None:
    """The run folder's results (collective gather, then rank 0 writes)."""
    cfg, topo, run_dir = trainer.cfg, trainer.topo, trainer.run_dir
    model_sd = trainer.gathered_weights(with_optimizer=False).model
    if not topo.is_main:
        return
    is_adapter = not cfg.is_full_finetune()
    out = outputs.save_trained(
        trainer.model, model_sd, trainer.tokenizer, run_dir / ("adapter" if is_adapter else "model"), is_adapter
    )
    summary = outputs.run_summary(trainer)
    summary["artifacts"] = {"adapter" if is_adapter else "model": str(out)}
    if cfg.merge_lora and is_adapter:
        emit({"stage": "merge", "event": "start"})
        dtype = trainer.precision.autocast_dtype or trainer.precision.load_dtype
        source = pretrained_source(cfg.base_model, cfg)
        summary["artifacts"]["merged"] = str(
            outputs.merge_adapter(out, run_dir / "merged", dtype, trainer.tokenizer, source)
        )
    png = outputs.plot_loss(run_dir, trainer.state.train_loss, trainer.state.eval_loss, trainer.state.curves)
    summary["artifacts"]["loss_png"] = str(png) if png else None
    outputs.write_summary(run_dir, summary)
    emit(
        {
            "stage": "train",
            "event": "done",
            "step": summary["steps"],
            "total_steps": summary["total_steps"],
            "loss": summary["final_loss"],
            "tokens_per_s": summary["tokens_per_s"],
        }
    )
    log.info(
        "training done: %d steps, final loss %s, %.0f tokens/s → %s",
        summary["steps"],
        summary["final_loss"],
        summary["tokens_per_s"],
        out,
    )

"""The run folder's results: adapter (PEFT) or model, merged model, summary.json, loss.png.

Each folder is written under a temporary name and renamed, like the checkpoints, so the publish
stage never sees half an adapter. The merged model is built from the saved adapter on a freshly
loaded base in the training dtype (never from a 4-bit base), so LoRA and QLoRA merge the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.train.reporting import peak_memory_gib

if TYPE_CHECKING:
    from worker.train.trainer import Trainer

log = logging.getLogger("ftw.train")


def atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_trained(model, state_dict: dict[str, Any], tokenizer, out: Path, is_adapter: bool) -> Path:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) or a full HF model, + tokenizer."""
    tmp = atomic_dir(out)
    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if is_adapter and not (tmp / "adapter_model.safetensors").is_file():
        from worker.errors import TrainingError

        raise TrainingError(
            "peft wrote no adapter_model.safetensors",
            hint="this is a bug in ftw's train stage; the checkpoints are kept, resubmit to retry",
        )
    return publish_dir(tmp, out)


def merge_adapter(adapter_dir: Path, out: Path, dtype, tokenizer, load_kwargs: dict[str, Any]) -> Path:
    """base + adapter → one safetensors model (LoRA deltas folded into the weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(**load_kwargs, dtype=dtype)
    if base.get_input_embeddings().weight.shape[0] < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = atomic_dir(out)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    log.info("merged model written to %s", out)
    return publish_dir(tmp, out)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
    return path


def run_summary(trainer: Trainer) -> dict[str, Any]:
    """summary.json's numbers (docs/contracts.md), from a trainer whose loop has ended; `finish` adds the artifacts."""
    s = trainer.state
    process_peak, steps_peak = peak_memory_gib(trainer.topo.device, trainer.setup_peak_bytes)
    return {
        "steps": s.step,
        "total_steps": trainer.schedule.total_steps,
        "epochs": round(s.step / trainer.plan.steps_per_epoch, 4),
        "tokens": s.tokens,
        "target_tokens": s.target_tokens,
        "tokens_per_s": round(trainer.tokens_this_run / max(trainer.runtime_s, 1e-9), 1),
        "steps_tokens_per_s": None if (rate := trainer.progress.pace.steps_rate) is None else round(rate, 1),
        "runtime_s": round(trainer.runtime_s, 2),
        "peak_memory_gib": round(process_peak, 3),
        "step_peak_memory_gib": None if steps_peak is None else round(steps_peak, 3),
        "peak_memory_kind": "cuda_allocated" if trainer.topo.device.type == "cuda" else "cpu_rss",
        "final_loss": s.train_loss[-1][1] if s.train_loss else None,
        "best_eval_loss": s.best_eval,
        "loss_curve": s.train_loss,
        "eval_curve": s.eval_loss,
        "resumed_from": trainer.resumed_from,
        "precision": trainer.precision.name,
        "strategy": trainer.strategy,
        "world_size": trainer.topo.world_size,
        "packed": trainer.data.packed,
        "padding_free": trainer.padding_free,
        "joined_micro_batch_tokens": trainer.join_tokens,  # a step's samples joined up to this many tokens a pass
        "graphed_optimizer_step": trainer.graphed_update is not None and trainer.graphed_update.graph is not None,
        "adapter": trainer.cfg.adapter or "full",
        "kernels": trainer.kernels,
        **trainer.progress.gpu_summary,
    }


def plot_loss(
    run_dir: Path,
    train: list[tuple[int, float]],
    evals: list[tuple[int, float]],
    curves: dict[str, list[tuple[int, float]]] | None = None,
) -> Path | None:
    """loss.png: train and eval loss, and under them the objective's plotted metrics (EBFT's CFM), one panel each."""
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = {name: points for name, points in (curves or {}).items() if points}
    fig, axes = plt.subplots(1 + len(extra), 1, figsize=(7, 4 + 2.5 * len(extra)), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_ylabel("loss")
    for row, (name, points) in enumerate(extra.items(), start=1):
        axes[row, 0].plot(*zip(*points), label=name, linewidth=1, color=f"C{row + 1}")
        axes[row, 0].set_ylabel(name)
    for panel in axes[:, 0]:
        panel.grid(alpha=0.3)
        panel.legend()
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

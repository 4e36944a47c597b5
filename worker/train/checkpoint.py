"""Checkpoints that survive anything: written under a temporary name, verified before use.

    RUN_DIR/checkpoints/checkpoint-<step>/
        adapter_config.json + adapter_model.safetensors   (LoRA: PEFT format, publishable as is)
        model.safetensors + config.json                   (full fine-tuning)
        optimizer.pt, scheduler.pt                         (not with save_only_model)
        deepspeed/                                         (DeepSpeed: its partitioned optimizer state instead of optimizer.pt)
        rng-<rank>.pt                                      (every rank's random state)
        ftw_state.json                                     step, epoch, trainer state, sha256 per file

A checkpoint is built as `.tmp-checkpoint-<step>`, its files fsynced, `ftw_state.json` written
last, then the folder renamed: a kill at any moment leaves either no `checkpoint-<step>` or a
whole one. `newest_complete` re-hashes every file listed before it trusts a checkpoint, so one
truncated or damaged on disk afterwards is skipped for the next older one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("ftw.train")

STATE_FILE = "ftw_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_dir(checkpoints: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint `step` (left-overs of a killed save are removed)."""
    tmp = checkpoints / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finalize(tmp: Path, step: int, state: dict[str, Any]) -> Path:
    """Hash every file, write ftw_state.json last, rename into place. Rank 0 only."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        _fsync(p)
    record = {
        **state,
        "step": step,
        "complete": True,
        "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
    }
    (tmp / STATE_FILE).write_text(json.dumps(record, indent=1))
    _fsync(tmp / STATE_FILE)
    final = tmp.parent / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (e.g. by a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(tmp.parent)
    return final


def read_state(path: Path, verify: bool = True) -> dict[str, Any] | None:
    """The checkpoint's state when it is complete and every file matches its hash; else None."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("complete") is not True or not isinstance(state.get("files"), dict):
        return None
    if verify:
        for rel, digest in state["files"].items():
            f = path / rel
            if not f.is_file() or sha256_file(f) != digest:
                log.warning("checkpoint %s is damaged (%s does not match its sha256): skipped", path.name, rel)
                return None
    return state


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def newest_complete(checkpoints: Path) -> Path | None:
    for _, path in reversed(list_checkpoints(checkpoints)):
        if read_state(path) is not None:
            return path
    return None


def rotate(checkpoints: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints (and `protect`, the best one under save_strategy: best)."""
    found = list_checkpoints(checkpoints)
    for _, path in found[: max(0, len(found) - keep)]:
        if protect is None or path.resolve() != protect.resolve():
            shutil.rmtree(path, ignore_errors=True)


# ---- a trainer's state in and out of a checkpoint (every rank calls these: they are collective) --
def save(trainer) -> Path | None:
    """checkpoint-<step> of `trainer` (a worker.train.trainer.Trainer); the path on rank 0."""
    import torch
    from safetensors.torch import save_file

    from worker.train import distributed as dist_

    cfg, topo, step = trainer.cfg, trainer.topo, trainer.state.step
    root = trainer.run_dir / "checkpoints"
    model_sd, optim_sd = trainer.full_state_dicts(with_optimizer=not cfg.save_only_model)
    tmp = root / f".tmp-checkpoint-{step}"
    if topo.is_main:
        tmp_dir(root, step)
    dist_.barrier(topo)
    torch.save(_rng_state(), tmp / f"rng-{topo.rank}.pt")
    if trainer.strategy == "deepspeed" and not cfg.save_only_model:
        from worker.train.deepspeed_engine import save_state

        save_state(trainer, tmp)  # every rank writes its partition into the checkpoint being built
    dist_.barrier(topo)
    final = None
    if topo.is_main:
        # a full model or PEFT adapter files, publishable as they are
        trainer.model.save_pretrained(str(tmp), state_dict=model_sd, safe_serialization=True)
        if not cfg.is_full_finetune():  # and for resume, the trainable tensors by their names in this model
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "trainable.safetensors"))
        trainer.tokenizer.save_pretrained(str(tmp))
        if optim_sd is not None:
            torch.save(optim_sd, tmp / "optimizer.pt")
        if not cfg.save_only_model:
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(trainer.scaler.state_dict(), tmp / "scaler.pt")
        final = finalize(tmp, step, trainer.state_record())
        if trainer.schedule.save_best and trainer.state.bad_evals == 0:
            trainer.state.best_checkpoint = final.name
        best = root / trainer.state.best_checkpoint if trainer.state.best_checkpoint else None
        rotate(root, cfg.save_total_limit, protect=best)
        trainer.progress.event(step=step, event="checkpoint", path=str(final))
        log.info("checkpoint saved: %s", final)
    dist_.barrier(topo)
    return final


def load(trainer, path: Path) -> None:
    """Weights, optimizer, scheduler, RNG and loop state of checkpoint `path` into `trainer`."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from worker.errors import JobSpecError
    from worker.train.trainer import LoopState

    state = read_state(path)
    if state is None:
        raise JobSpecError(f"checkpoint {path} is incomplete or damaged", hint="remove it, or resume from an older one")
    weights = path / ("model.safetensors" if trainer.cfg.is_full_finetune() else "trainable.safetensors")
    model_sd = load_file(str(weights))
    expected = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    missing = expected - set(model_sd)
    if trainer.cfg.is_full_finetune():  # tied weights are stored once
        missing = {
            n
            for n in missing
            if not (n.endswith("lm_head.weight") and getattr(trainer.model.config, "tie_word_embeddings", False))
        }
    if missing:
        raise JobSpecError(
            f"checkpoint {path.name} does not match this model/adapter ({len(missing)} trainable tensors missing, e.g. {sorted(missing)[0]})",
            hint="resume with the same base_model and adapter settings, or start a new run_id",
        )
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(trainer.model, model_sd, options=opts)
    if (path / "optimizer.pt").is_file() and trainer.strategy != "deepspeed":
        optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(trainer.model, trainer.optimizer, optim_sd, options=opts)
    if (path / "scheduler.pt").is_file():  # DeepSpeed's optimizer partitions load with its engine
        trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        trainer.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    else:
        log.warning("checkpoint %s was saved with save_only_model: optimizer and schedule restart", path.name)
    rng = path / f"rng-{trainer.topo.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    loop = state["loop"]
    trainer.state = LoopState(
        **{
            **loop,
            "train_loss": [tuple(x) for x in loop["train_loss"]],
            "eval_loss": [tuple(x) for x in loop["eval_loss"]],
        }
    )
    if state.get("world_size") != trainer.topo.world_size:
        log.warning(
            "checkpoint written by %s process(es), resumed by %d: the global batch changes",
            state.get("world_size"),
            trainer.topo.world_size,
        )


def _rng_state() -> dict[str, Any]:
    import random

    import torch

    out: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

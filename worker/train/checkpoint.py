"""Checkpoints that survive anything: written under a temporary name, verified before use.

    RUN_DIR/checkpoints/checkpoint-<step>/
        adapter_config.json + adapter_model.safetensors   (LoRA: PEFT format, publishable as is)
        model.safetensors + config.json                   (full fine-tuning)
        optimizer.pt, scheduler.pt                         (not with save_only_model)
        deepspeed/                                         (DeepSpeed: its partitioned optimizer state,
                                                            instead of optimizer.pt)
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.config import TrainingConfig
from worker.errors import JobSpecError

if TYPE_CHECKING:  # torch is imported where tensors are saved or loaded: the file functions need none
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel

    from worker.train.distributed import Topology

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


# ---- the training state in and out of a checkpoint (every rank calls these: they are collective) -
@dataclass
class LoopState:
    """Everything about the run's progress that a checkpoint carries besides tensors."""

    step: int = 0
    tokens: int = 0
    target_tokens: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # the objective's `plotted` metrics
    best_eval: float | None = None
    best_checkpoint: str | None = None
    bad_evals: int = 0


@dataclass
class CheckpointState:
    """What ftw_state.json records besides the file hashes: written by `save`, returned by `load`."""

    loop: LoopState
    epoch: float | None
    world_size: int | None  # the processes that wrote it (None in a record that does not say)

    def record(self) -> dict[str, Any]:
        return {"loop": asdict(self.loop), "epoch": self.epoch, "world_size": self.world_size}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CheckpointState:
        loop = record["loop"]
        losses = {key: [tuple(point) for point in loop[key]] for key in ("train_loss", "eval_loss")}
        curves = {name: [tuple(point) for point in points] for name, points in (loop.get("curves") or {}).items()}
        return cls(LoopState(**{**loop, **losses, "curves": curves}), record.get("epoch"), record.get("world_size"))


@dataclass
class TrainingObjects:
    """The live objects a checkpoint is written from and loaded into, handed over by the trainer."""

    model: PeftModel | PreTrainedModel  # the PEFT model, or in full fine-tuning the model itself
    tokenizer: Any  # a transformers tokenizer, saved beside the weights
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler (state_dict / load_state_dict)
    scaler: torch.amp.GradScaler
    # under DeepSpeed: writes its partitioned optimizer state into the folder being built (its engine
    # loads it back on resume); None when the optimizer state is ftw's own optimizer.pt
    save_optimizer_partitions: Callable[[Path], None] | None = None


@dataclass
class GatheredWeights:
    """Trainable weights (every weight in full fine-tuning) and optimizer state, whole on the CPU."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # None with save_only_model or DeepSpeed (which saves its own)


def gathered(model: Any, optimizer: Any, full_finetune: bool) -> GatheredWeights:
    """The trainable weights (every weight in full fine-tuning) and, given `optimizer`, its state, whole on every
    rank's CPU: a collective (FSDP's shards are gathered)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not full_finetune)
    optim_sd = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts)
    return GatheredWeights(get_model_state_dict(model, options=opts), optim_sd)


def save(
    root: Path,
    objects: TrainingObjects,
    state: CheckpointState,
    weights: GatheredWeights,
    cfg: TrainingConfig,
    topo: Topology,
    mark_best: bool,
) -> Path | None:
    """checkpoint-<step> under `root`; its path on rank 0. `mark_best` (save_strategy: best, eval
    improved) makes it `state.loop.best_checkpoint`, the one rotation keeps."""
    import torch
    from safetensors.torch import save_file

    from worker.train import distributed as dist_

    step = state.loop.step
    tmp = root / f".tmp-checkpoint-{step}"
    if topo.is_main:
        tmp_dir(root, step)
    dist_.barrier(topo)
    torch.save(_rng_state(), tmp / f"rng-{topo.rank}.pt")
    if objects.save_optimizer_partitions is not None and not cfg.save_only_model:
        objects.save_optimizer_partitions(tmp)  # every rank writes its partition into the checkpoint being built
    dist_.barrier(topo)
    final = None
    if topo.is_main:
        # a full model or PEFT adapter files, publishable as they are
        objects.model.save_pretrained(str(tmp), state_dict=weights.model, safe_serialization=True)
        if not cfg.is_full_finetune():  # and for resume, the trainable tensors by their names in this model
            save_file({k: v.contiguous() for k, v in weights.model.items()}, str(tmp / "trainable.safetensors"))
        objects.tokenizer.save_pretrained(str(tmp))
        if weights.optimizer is not None:
            torch.save(weights.optimizer, tmp / "optimizer.pt")
        if not cfg.save_only_model:
            torch.save(objects.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(objects.scaler.state_dict(), tmp / "scaler.pt")
        final = finalize(tmp, step, state.record())
        loop = state.loop
        if mark_best:
            loop.best_checkpoint = final.name
        rotate(root, cfg.save_total_limit, protect=root / loop.best_checkpoint if loop.best_checkpoint else None)
        log.info("checkpoint saved: %s", final)
    dist_.barrier(topo)
    return final


def load(path: Path, objects: TrainingObjects, cfg: TrainingConfig, topo: Topology) -> CheckpointState:
    """Weights, optimizer, scheduler and RNG of checkpoint `path` into `objects`; its recorded state."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    record = read_state(path)
    if record is None:
        raise JobSpecError(f"checkpoint {path} is incomplete or damaged", hint="remove it, or resume from an older one")
    model = objects.model
    weights = path / ("model.safetensors" if cfg.is_full_finetune() else "trainable.safetensors")
    model_sd: dict[str, Any] = load_file(str(weights))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = expected - set(model_sd)
    if cfg.is_full_finetune():  # tied weights are stored once
        tied = getattr(model.config, "tie_word_embeddings", False)
        missing = {n for n in missing if not (n.endswith("lm_head.weight") and tied)}
    if missing:
        raise JobSpecError(
            f"checkpoint {path.name} does not match this model/adapter "
            f"({len(missing)} trainable tensors missing, e.g. {sorted(missing)[0]})",
            hint="resume with the same base_model and adapter settings, or start a new run_id",
        )
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_sd, options=opts)
    if (path / "optimizer.pt").is_file() and objects.save_optimizer_partitions is None:
        optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, objects.optimizer, optim_sd, options=opts)
    if (path / "scheduler.pt").is_file():  # DeepSpeed's optimizer partitions load with its engine
        objects.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        objects.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    else:
        log.warning("checkpoint %s was saved with save_only_model: optimizer and schedule restart", path.name)
    rng = path / f"rng-{topo.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    state = CheckpointState.from_record(record)
    if state.world_size != topo.world_size:
        log.warning(
            "checkpoint written by %s process(es), resumed by %d: the global batch changes",
            state.world_size,
            topo.world_size,
        )
    return state


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

"""DeepSpeed ZeRO under ftw's own loop: `deepspeed: zero1|zero2|zero3[_offload]` or a user's dict.

DeepSpeed owns what it is for — partitioning optimizer state (ZeRO-1), gradients (ZeRO-2) and
parameters (ZeRO-3), their CPU offload, its mixed-precision master weights, gradient clipping —
while ftw keeps the loop: data order, the global per-token loss, the learning-rate schedule
(stepped by ftw on the optimizer DeepSpeed wraps), progress events, SIGTERM.

The DeepSpeed config is the user's (or the preset's `zero_optimization`) with the keys ftw owns
filled from the ftw config, whatever the user wrote there ("auto" or a number): batch shape,
gradient_clipping (max_grad_norm), bf16/fp16 (the ftw precision). A torch optimizer built by ftw
is passed in, so `zero_force_ds_cpu_optimizer` is off (offload runs torch's optimizer on the CPU;
no DeepSpeed op is compiled). `optimizer`/`scheduler` sections are refused at validation.

Checkpoints stay ftw's (atomic, sha256-verified, a publishable PEFT adapter or model): the
weights are gathered whole into them as for DDP/FSDP2, and DeepSpeed's own `save_checkpoint`
writes its partitioned optimizer state into the checkpoint's `deepspeed/` folder before the
checkpoint is hashed and renamed. Resume loads the weights, schedule, RNG and loop state the
ftw way, then the optimizer partitions with `load_checkpoint`; those need the same number of
processes (ZeRO partitions by rank), a different count resumes the weights and restarts the
optimizer, with a warning.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from schemas.config import TrainingConfig

log = logging.getLogger("ftw.train")

STATE_DIR = "deepspeed"  # DeepSpeed's partitioned optimizer state inside an ftw checkpoint
TAG = "state"
PRESETS: dict[str, dict[str, Any]] = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3": {"stage": 3},
    "zero3_offload": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
}


def zero_section(cfg: TrainingConfig) -> dict[str, Any]:
    """The `zero_optimization` section the config names (a preset, or the user's dict's own)."""
    if isinstance(cfg.deepspeed, str):
        return copy.deepcopy(PRESETS[cfg.deepspeed])
    return copy.deepcopy((cfg.deepspeed or {}).get("zero_optimization") or {"stage": 0})


def build_config(
    cfg: TrainingConfig, rows_per_micro: int, grad_accum: int, world_size: int, precision_dtype: torch.dtype | None
) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize` (see the module docstring for who owns which key)."""
    user = copy.deepcopy(cfg.deepspeed) if isinstance(cfg.deepspeed, dict) else {}
    ds = {k: v for k, v in user.items() if k not in ("optimizer", "scheduler")}
    ds["zero_optimization"] = zero_section(cfg)
    ds["train_micro_batch_size_per_gpu"] = rows_per_micro
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = rows_per_micro * grad_accum * world_size
    ds["gradient_clipping"] = float(cfg.max_grad_norm or 0.0)
    ds["bf16"] = {**_section(user.get("bf16")), "enabled": precision_dtype == torch.bfloat16}
    ds["fp16"] = {**_section(user.get("fp16")), "enabled": precision_dtype == torch.float16}
    ds["zero_force_ds_cpu_optimizer"] = False  # ftw's torch optimizer, also when offloaded
    ds["zero_allow_untested_optimizer"] = (
        True  # any optimizer ftw builds (sgd, adafactor, muon, bnb), not only Adam/Lamb
    )
    ds.setdefault("steps_per_print", 2**31 - 1)  # ftw reports progress itself
    ds.setdefault("wall_clock_breakdown", False)
    return _drop_auto(ds)


def _section(value: Any) -> dict[str, Any]:
    return {k: v for k, v in value.items() if v != "auto"} if isinstance(value, dict) else {}


def _drop_auto(value: Any) -> Any:
    """HF/axolotl DeepSpeed files say "auto" for what the trainer fills; what ftw does not fill
    falls back to DeepSpeed's default."""
    if isinstance(value, dict):
        return {k: _drop_auto(v) for k, v in value.items() if v != "auto"}
    return value


def initialize(trainer, resume: Path | None):
    """DeepSpeed's engine around the trainer's model and torch optimizer (after an ftw resume
    put the weights in the plain model), with the optimizer partitions of `resume` loaded."""
    import deepspeed

    cfg, topo, plan = trainer.cfg, trainer.topo, trainer.plan
    config = build_config(cfg, plan.rows_per_micro, plan.grad_accum, topo.world_size, trainer.precision.autocast_dtype)
    engine, _, _, _ = deepspeed.initialize(
        model=trainer.model, optimizer=trainer.optimizer, config=config, dist_init_required=False
    )
    zero = config["zero_optimization"]
    log.info(
        "DeepSpeed %s over %d ranks: ZeRO stage %d, optimizer offload %s, parameter offload %s",
        deepspeed.__version__,
        topo.world_size,
        zero.get("stage", 0),
        _device(zero, "offload_optimizer"),
        _device(zero, "offload_param"),
    )
    state = resume / STATE_DIR if resume is not None else None
    if state is not None and state.is_dir():
        written_by = json.loads((resume / "ftw_state.json").read_text()).get("world_size")
        if written_by == topo.world_size:
            engine.load_checkpoint(
                str(state),
                tag=TAG,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        else:
            log.warning(
                "checkpoint %s holds DeepSpeed optimizer partitions of %s process(es), this run has %d: weights "
                "resumed, optimizer state restarts",
                resume.name,
                written_by,
                topo.world_size,
            )
    elif resume is not None:
        log.warning(
            "checkpoint %s has no DeepSpeed optimizer state (save_only_model or another strategy): the optimizer "
            "restarts",
            resume.name,
        )
    return engine


def _device(zero: dict[str, Any], key: str) -> str:
    return (zero.get(key) or {}).get("device", "none")


def backward(engine, loss: torch.Tensor) -> None:
    """One micro-batch's backward. The loss is already this rank's share of the global mean
    (DeepSpeed must not divide it by the accumulation steps again); `step` after every
    micro-batch is DeepSpeed's contract: it reduces and steps only at the accumulation boundary."""
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def grad_norm(engine, device: torch.device) -> torch.Tensor:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return torch.full((), float("nan"), dtype=torch.float64, device=device)
    return torch.as_tensor(norm, dtype=torch.float64).to(device)


def trainable_state_dict(trainer) -> dict[str, torch.Tensor]:
    """Trainable weights (every weight in full fine-tuning) whole on every rank's CPU — collective.
    Under ZeRO-3 each parameter is gathered in turn, so no more than one is whole at a time."""
    from deepspeed.runtime.zero import GatheredParameters

    full = trainer.cfg.is_full_finetune()
    out = {}
    for name, p in trainer.model.named_parameters():
        if not (full or p.requires_grad):
            continue
        with GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
            out[name] = p.detach().to("cpu", copy=True)
    return out


def save_state(trainer, folder: Path) -> None:
    """DeepSpeed's optimizer partitions (and its engine counters) into `folder` — every rank."""
    trainer.engine.save_checkpoint(
        str(folder / STATE_DIR), tag=TAG, exclude_frozen_parameters=not trainer.cfg.is_full_finetune()
    )

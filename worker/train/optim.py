"""Optimizers by axolotl name (the registry in schemas/optimizers.py: names, not paths) and learning-rate schedules.

Schedules come from `transformers.get_scheduler` where it has them; axolotl's extras (REX,
one_cycle, cosine_min_lr_ratio) are built here on torch's LambdaLR / OneCycleLR.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from schemas.config import TrainingConfig
from schemas.optimizers import OPTIMIZERS, Family, OptimizerSpec
from worker.errors import JobSpecError


def _optim_args(cfg: TrainingConfig) -> dict[str, Any]:
    """optim_args as a dict or axolotl's "k=v,k=v" string; values parsed as JSON where they can be."""
    raw = cfg.optim_args or {}
    if isinstance(raw, dict):
        return dict(raw)
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


ParamGroups = list[dict[str, Any]]


def build_optimizer(
    cfg: TrainingConfig, named_params: Iterable[tuple[str, torch.nn.Parameter]], device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer the registry (schemas/optimizers.py) names, built by its family's builder."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    # no weight decay on biases and norms (HF Trainer's rule)
    decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    spec = OPTIMIZERS.get(cfg.optimizer)
    if spec is None:  # validation refuses it; a config that skipped validation gets the same answer
        raise JobSpecError(f"optimizer {cfg.optimizer!r} is not known", hint=f"use one of {', '.join(OPTIMIZERS)}")
    missing = [package for package in spec.packages if importlib.util.find_spec(package) is None]
    if missing or (spec.needs_cuda and device.type != "cuda"):  # the checks said yes on another view of the machine
        raise JobSpecError(
            f"optimizer {cfg.optimizer} needs {spec.requirement()}", hint="use optimizer: adamw_torch_fused"
        )
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, **spec.fixed}
    if spec.adam:
        kwargs.update(betas=(cfg.adam_beta1 or 0.9, cfg.adam_beta2 or 0.999), eps=cfg.adam_epsilon or 1e-8)
    if spec.fused_on_cuda and device.type == "cuda":
        kwargs["fused"] = True
    kwargs.update(_optim_args(cfg))
    return BUILDERS[spec.family](cfg.optimizer, spec, groups, kwargs, device)


def _torch(
    name: str, spec: OptimizerSpec, groups: ParamGroups, kwargs: dict[str, Any], device: torch.device
) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, spec.class_name, None)
    if cls is None:
        raise JobSpecError(
            f"optimizer {name} needs torch.optim.{spec.class_name}, which torch {torch.__version__} does not have",
            hint="use adamw_torch_fused, adamw_torch, adafactor or sgd",
        )
    optimizer: torch.optim.Optimizer = cls(groups, **kwargs)
    return optimizer


def _muon(
    name: str, spec: OptimizerSpec, groups: ParamGroups, kwargs: dict[str, Any], device: torch.device
) -> torch.optim.Optimizer:
    if any(p.ndim != 2 for g in groups for p in g["params"]):
        raise JobSpecError(
            "optimizer: muon trains 2-D weights only, and this model has other trainable parameters",
            hint="use muon with a LoRA adapter, or adamw_torch",
        )
    return _torch(name, spec, groups, kwargs, device)


Builder = Callable[[str, OptimizerSpec, ParamGroups, dict[str, Any], torch.device], torch.optim.Optimizer]


def _class_in(module: str) -> Builder:
    """A builder for a family whose optimizers are classes of `module`, imported when one is built."""

    def build(
        name: str, spec: OptimizerSpec, groups: ParamGroups, kwargs: dict[str, Any], device: torch.device
    ) -> torch.optim.Optimizer:
        optimizer: torch.optim.Optimizer = getattr(importlib.import_module(module), spec.class_name)(groups, **kwargs)
        return optimizer

    return build


BUILDERS: dict[Family, Builder] = {
    "torch": _torch,
    "muon": _muon,
    "transformers": _class_in("transformers.optimization"),
    "bitsandbytes": _class_in("bitsandbytes.optim"),
    "torchao": _class_in("torchao.optim"),
}


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The gradients' total 2-norm, after scaling them down to `max_norm` where they exceed it: torch's
    clip_grad_norm_, the same kernels and the same result, without its Python work per tensor (a `.to` for each
    gradient's norm, ~2 ms of a short step's host time for a 1B LoRA's 224 tensors on a slow host, measured with
    bench/host_samples.py). Sharded (DTensor) gradients, or ones on several devices or in several dtypes, go to
    torch's."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(
        type(g) is not torch.Tensor or (g.device, g.dtype) != (grads[0].device, grads[0].dtype) for g in grads
    ):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return clip_to_norm(grads, max_norm)


def clip_to_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`clip_gradients` over plain tensors of one device and dtype: device work only, so a CUDA graph can hold it
    (worker/train/graphed_update.py)."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if math.isfinite(max_norm):  # torch's coefficient, clamped at 1: gradients under the bound are left as they are
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


def build_scheduler(cfg: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    warm = warmup_steps(cfg, total_steps)
    kwargs = dict(cfg.lr_scheduler_kwargs or {})
    name = cfg.lr_scheduler
    if name in ("cosine", "cosine_with_min_lr") and cfg.cosine_min_lr_ratio is not None:
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": cfg.cosine_min_lr_ratio, **kwargs}
    if name == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.learning_rate, total_steps=total_steps, pct_start=max(warm, 1) / total_steps, **kwargs
        )
    if name == "rex":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rex(step, warm, total_steps))
    if name == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, (total_steps - warm) // 10))
    try:
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warm,
            num_training_steps=total_steps,
            scheduler_specific_kwargs=kwargs or None,
        )
    except (ValueError, TypeError) as e:
        raise JobSpecError(
            f"lr_scheduler {name}: {e}", hint="check lr_scheduler_kwargs (cosine_with_min_lr needs cosine_min_lr_ratio)"
        ) from e


def _rex(step: int, warm: int, total: int) -> float:
    """REX schedule (Chen et al. 2022): linear warmup, then (1 - p) / (1 - p/2)."""
    if step < warm:
        return (step + 1) / max(warm, 1)
    p = min(1.0, (step - warm) / max(total - warm, 1))
    return (1 - p) / (1 - p / 2)

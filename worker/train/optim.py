"""Optimizers by axolotl name and learning-rate schedules (a closed registry: names, not paths).

Schedules come from `transformers.get_scheduler` where it has them; axolotl's extras (REX,
one_cycle, cosine_min_lr_ratio) are built here on torch's LambdaLR / OneCycleLR.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterable
from typing import Any

import torch

from schemas.config import TrainingConfig
from worker.errors import JobSpecError
from worker.preflight import BNB_OPTIMIZERS


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


def build_optimizer(
    cfg: TrainingConfig, named_params: Iterable[tuple[str, torch.nn.Parameter]], device: torch.device
) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in named_params if p.requires_grad]
    # no weight decay on biases and norms (HF Trainer's rule)
    decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    betas = (cfg.adam_beta1 or 0.9, cfg.adam_beta2 or 0.999)
    eps = cfg.adam_epsilon or 1e-8
    extra = _optim_args(cfg)
    name, lr = cfg.optimizer, cfg.learning_rate
    if name in ("adamw_torch", "adamw_hf", "adamw_torch_fused"):
        fused = name == "adamw_torch_fused" and device.type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, **extra)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **extra)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, **extra)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, **extra)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, **extra)
    if name == "muon" and hasattr(torch.optim, "Muon"):
        if no_decay and any(p.ndim != 2 for p in no_decay):
            raise JobSpecError(
                "optimizer: muon trains 2-D weights only, and this model has other trainable parameters",
                hint="use muon with a LoRA adapter, or adamw_torch",
            )
        return torch.optim.Muon(groups, lr=lr, **extra)
    if name in BNB_OPTIMIZERS:
        if importlib.util.find_spec("bitsandbytes") is None or device.type != "cuda":
            raise JobSpecError(
                f"optimizer {name} needs bitsandbytes on a CUDA GPU", hint="use optimizer: adamw_torch_fused"
            )
        import bitsandbytes.optim as bnb_optim

        cls = getattr(bnb_optim, BNB_OPTIMIZERS[name])
        kwargs = {} if "lion" in name else {"betas": betas, "eps": eps}
        return cls(groups, lr=lr, **kwargs, **extra)
    raise JobSpecError(
        f"optimizer {name!r} is not available in this build of ftw",
        hint="use adamw_torch_fused, adamw_torch, adafactor or sgd",
    )


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

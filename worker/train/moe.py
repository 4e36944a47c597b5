"""Mixture-of-experts models (Qwen3-MoE, OLMoE, Mixtral, GPT-OSS in transformers 5): LoRA targets,
the experts dispatch, and the router's auxiliary loss.

- `lora_targets(names, parameters, model)`: router modules (`gate`, `router`) are not nn.Linear in
  transformers 5 (they hold a bare `weight`), so a router named in lora_target_modules becomes a
  PEFT `target_parameters` entry on its weight, beside the expert tensors of lora_target_parameters.
- `set_experts_dispatch(model, cfg)`: experts_implementation eager / grouped_mm / batched_mm
  through transformers' own switch (`scattermoe`, ftw's kernel, is the kernel registry's job).
- `configure_router_loss(model, cfg, micro_per_step)`: with output_router_logits the model adds
  coef × aux to every micro-batch's loss; the trainer's loss is a mean over the whole optimizer
  step, so the coefficient is divided by the micro-batches per step (gradient accumulation ×
  ranks): the aux term then weighs what router_aux_loss_coef says, once per step.
"""

from __future__ import annotations

import logging

import torch

from ftw_kernels.moe import experts_modules
from schemas.config import TrainingConfig
from worker.errors import JobSpecError

log = logging.getLogger("ftw.train")
ROUTER_NAMES = ("gate", "router")


def is_moe(model) -> bool:
    return bool(experts_modules(model))


def lora_targets(
    modules: list[str] | None, parameters: list[str] | None, model
) -> tuple[list[str] | None, list[str] | None]:
    """(target_modules, target_parameters) for PEFT: routers named as modules move to parameters."""
    parameters = list(parameters or [])
    if not modules:
        return modules, parameters or None
    kept = []
    for name in modules:
        found = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        router = found and all(
            not isinstance(m, torch.nn.Linear)
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
            and m.weight.dim() == 2
            and type(m).__name__.endswith("Router")
            for m in found
        )
        if router:
            parameters.append(f"{name}.weight")
        else:
            kept.append(name)
    return kept or None, parameters or None


def set_experts_dispatch(model, cfg: TrainingConfig) -> None:
    impl = cfg.experts_implementation
    if impl is None or impl == "scattermoe":
        return
    if not is_moe(model):
        log.warning("experts_implementation %s has no effect: %s has no experts", impl, type(model).__name__)
        return
    model.set_experts_implementation(impl)
    log.info("experts implementation: %s", impl)


def configure_router_loss(model, cfg: TrainingConfig, micro_per_step: int) -> bool:
    """Switch the router aux loss on as the config asks; True when it is on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not cfg.output_router_logits:
        return False
    if not hasattr(base, "router_aux_loss_coef"):
        raise JobSpecError(
            f"output_router_logits: true, but {type(base).__name__} has no router auxiliary loss",
            hint="remove output_router_logits / router_aux_loss_coef for this model",
        )
    coef = cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None else base.config.router_aux_loss_coef
    base.config.output_router_logits = True
    base.router_aux_loss_coef = coef / micro_per_step  # read by the model's forward on each micro-batch
    log.info("router aux loss on: coefficient %g per optimizer step", coef)
    return True

"""Adapters through peft: LoRA / QLoRA (new, or continued from lora_model_dir) and full fine-tuning.

`attach(model, cfg)` returns the model to train with exactly the parameters that should learn
set to requires_grad. An adapter continued from `lora_model_dir` is loaded once, as the trainable
adapter, instead of being created and then loaded on top (axolotl #2568 applied it twice).
"""

from __future__ import annotations

import logging
from pathlib import Path

from schemas.config import TrainingConfig
from schemas.paths import is_local, local_path
from worker.errors import JobSpecError, ModelError
from worker.train.moe import lora_targets

log = logging.getLogger("ftw.train")


def linear_module_names(model) -> list[str]:
    """Short names of every Linear layer but the output head (axolotl's lora_target_linear).

    Short names ("q_proj", ...) rather than peft's expanded full paths keep adapter_config.json
    the shape vLLM and other loaders expect."""
    import torch

    head = model.get_output_embeddings()
    linear_types = [torch.nn.Linear]
    try:
        import bitsandbytes as bnb

        linear_types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:
        pass
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, tuple(linear_types)) and m is not head
    }
    return sorted(names)


def target_modules(cfg: TrainingConfig, model) -> list[str] | None:
    if cfg.lora_target_linear:
        return linear_module_names(model)
    if isinstance(cfg.lora_target_modules, str):
        return [cfg.lora_target_modules]
    return cfg.lora_target_modules  # None: peft's default for the architecture


def lora_config(cfg: TrainingConfig, model):
    """LoRA on modules and, for MoE models, on parameters (3-D expert tensors, router weights)."""
    from peft import LoraConfig

    modules, parameters = target_modules(cfg, model), cfg.lora_target_parameters
    if not isinstance(modules, str):  # a regex is PEFT's to match as it is
        modules, parameters = lora_targets(modules, [parameters] if isinstance(parameters, str) else parameters, model)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha_value(),
        lora_dropout=cfg.lora_dropout,
        target_modules=modules,
        target_parameters=parameters,
        modules_to_save=cfg.lora_modules_to_save,
        fan_in_fan_out=cfg.lora_fan_in_fan_out,
        bias=cfg.lora_bias,
        use_dora=cfg.peft_use_dora,
        use_rslora=cfg.peft_use_rslora,
        layers_to_transform=cfg.peft_layers_to_transform,
        task_type="CAUSAL_LM",
    )


def prepare_quantized(model, cfg: TrainingConfig):
    """A 4-bit or 8-bit base under bf16 is only frozen. PEFT's prepare_model_for_kbit_training also casts every
    bf16 weight but the quantised ones to fp32 (embeddings, norms, output layer): the residual stream
    then runs in fp32, doubling the activations kept for backward (issue 13: 76 GiB at 8B where
    Unsloth needs 36) for a stability that bf16, unlike fp16, does not need; checkpointing and the
    inputs' gradients are load_model's already. fp16 bases keep PEFT's preparation, with the
    checkpointing options load_model chose (PEFT re-enables checkpointing with its own otherwise)."""
    import torch
    from peft import prepare_model_for_kbit_training

    from worker.train.model import checkpointing_kwargs

    if (cfg.load_in_4bit or cfg.load_in_8bit) and model.dtype == torch.bfloat16:
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(cfg.gradient_checkpointing),
        gradient_checkpointing_kwargs=checkpointing_kwargs(cfg, model),
    )


def attach(model, cfg: TrainingConfig):
    """The trainable model: a PeftModel for lora/qlora, the model itself for full fine-tuning."""
    if cfg.is_full_finetune():
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import PeftModel, get_peft_model

    if cfg.load_in_4bit or cfg.load_in_8bit:
        model = prepare_quantized(model, cfg)
    if cfg.lora_model_dir:
        source = str(local_path(cfg.lora_model_dir)) if is_local(cfg.lora_model_dir) else cfg.lora_model_dir
        if is_local(cfg.lora_model_dir) and not (Path(source) / "adapter_config.json").is_file():
            raise JobSpecError(
                f"lora_model_dir {cfg.lora_model_dir!r} holds no adapter_config.json",
                hint="point lora_model_dir at a PEFT adapter folder",
            )
        try:
            peft_model = PeftModel.from_pretrained(model, source, is_trainable=True)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"cannot load the adapter in lora_model_dir {cfg.lora_model_dir!r}: {e}",
                hint="it must be a PEFT LoRA adapter for this base_model",
            ) from e
        log.info("continuing adapter from %s (loaded once, trainable)", cfg.lora_model_dir)
    else:
        try:
            peft_model = get_peft_model(model, lora_config(cfg, model))
        except ValueError as e:
            raise JobSpecError(
                f"cannot attach LoRA: {e}",
                hint=(
                    "check lora_target_modules (and lora_target_parameters) against the model's module and parameter "
                    "names"
                ),
            ) from e
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info(
        "adapter %s: %d trainable of %d parameters (%.3f%%)",
        cfg.adapter,
        trainable,
        total,
        100 * trainable / max(total, 1),
    )
    return peft_model

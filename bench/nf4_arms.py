"""The arms of bench/train_throughput.py over one saved base loaded in bitsandbytes nf4 (QLoRA; bench/qlora.py runs
them side by side with Unsloth's) or int8 (`--8bit`): PEFT's recipe, and ftw's (the preparation `ftw train` does,
then the kernels; ftw-fp8 with `fp8_base_weights`: the 4-bit weights' matmuls in float8; ftw-peft-lora: ftw's
kernels with PEFT's LoRA layers, what an 8-bit base ran before the fused LoRA took int8 weights)."""

from __future__ import annotations

from typing import Any

from bench import unsloth_arm
from bench.models import UNFUSED_LORA


def build(
    arm: str, shape: str, gc: bool, seq: int, targets: list[str], bits: int = 4
) -> tuple[Any, Any, int, int, list[str]]:
    """train_throughput's `build` over the base saved by bench/unsloth_arm.py, in nf4 (`bits` 4) or int8 (8): arm
    hf is PEFT's recipe, arm ftw ftw's (the same preparation as `ftw train`, then the kernels)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from schemas.config import TrainingConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        unsloth_arm.model_folder(shape, seq),
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        quantization_config=quant,
        device_map={"": "cuda" if torch.cuda.is_available() else "cpu"},  # CPU: a dry run of the arm
        use_cache=False,
    )
    n_frozen = unsloth_arm.linear_numel(model)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    applied: list[str] = []
    if arm == "hf":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        model = get_peft_model(model, lora)
    elif arm in ("ftw", "ftw-fp8", "ftw-peft-lora"):
        from ftw_kernels import apply_kernels
        from worker.train.adapters import prepare_quantized
        from worker.train.model import checkpointing_kwargs

        unfused = UNFUSED_LORA if arm == "ftw-peft-lora" else ()
        cfg = TrainingConfig(
            base_model=shape,
            learning_rate=1e-4,
            adapter="qlora" if bits == 4 else "lora",
            load_in_4bit=bits == 4,
            load_in_8bit=bits == 8,
            lora_r=16,
            lora_alpha=32,
            gradient_checkpointing=gc,
            fp8_base_weights=arm == "ftw-fp8",  # the 4-bit weights' matmuls in float8
            **dict.fromkeys(unfused, False),
        )
        if gc:  # as worker.train.model.load_model does
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(cfg, model))
            model.enable_input_require_grads()
        model = get_peft_model(prepare_quantized(model, cfg), lora)
        applied = apply_kernels(model, cfg)
    else:
        raise ValueError(f"no build over a {bits}-bit base for arm {arm!r}")
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model.train(), model.config, n_frozen, n_lora, applied


def dequantised(steps: int) -> float:
    """The quantised weights' dequantisations a step over `steps` steps (kernels/ftw_kernels/qlora.py)."""
    from ftw_kernels import qlora

    return round(qlora.dequantisations() / steps, 1)

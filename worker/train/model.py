"""Model builder: precision, attention backend, tokens, checkpointing, kernels.

`load_model(cfg, tokenizer, precision)` takes the validated TrainingConfig and the tokenizer
(worker/data/tokenizer.py, the one both stages load) and returns the Hugging Face model, placed on
the current device. What it needs from the machine (CUDA for QLoRA, installed attention packages)
was checked once per job, by the orchestrator's checks stage (worker/checks), before this child
started.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ftw_kernels import apply_kernels
from schemas.config import TrainingConfig
from worker.data.tokenizer import pretrained_source
from worker.errors import JobSpecError, ModelError
from worker.train.moe import is_moe, set_experts_dispatch

log = logging.getLogger("ftw.train")


@dataclass(frozen=True)
class Precision:
    """What the config's bf16/fp16/tf32 keys resolve to on this machine."""

    load_dtype: torch.dtype  # dtype of the frozen base weights
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)
    tf32: bool

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The forward's autocast context (none in fp32)."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype, "fp32")  # type: ignore[arg-type]


def resolve_precision(cfg: TrainingConfig, device: torch.device) -> Precision:
    """ "auto" follows the hardware; on CPU training runs in fp32 whatever the config says."""
    if device.type != "cuda":
        return Precision(torch.float32, None, False)
    bf16_ok = torch.cuda.is_bf16_supported()
    tf32 = cfg.tf32 is True or (cfg.tf32 == "auto" and torch.cuda.get_device_capability(device)[0] >= 8)
    if cfg.bf16 is True and not bf16_ok:
        raise JobSpecError("bf16: true, but this GPU has no bfloat16 support", hint="set bf16: false and fp16: true")
    if cfg.fp16 or cfg.float16:
        # full fine-tuning keeps fp32 master weights; adapters train in fp32 over an fp16 base
        return Precision(torch.float32 if cfg.is_full_finetune() else torch.float16, torch.float16, tf32)
    if cfg.bf16 is True or cfg.bfloat16 or (cfg.bf16 == "auto" and bf16_ok):
        return Precision(torch.bfloat16, torch.bfloat16, tf32)
    return Precision(torch.float32, None, tf32)


def _quantization(cfg: TrainingConfig, precision: Precision):
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=precision.autocast_dtype or torch.float32,
        bnb_4bit_quant_storage=precision.load_dtype,
    )


def load_model(cfg: TrainingConfig, tokenizer, precision: Precision, device: torch.device):
    """The base model on `device` (before adapters), embeddings resized to the tokenizer."""
    from transformers import AutoModelForCausalLM

    if (cfg.load_in_4bit or cfg.load_in_8bit) and device.type != "cuda":  # the checks saw a GPU torch cannot use
        raise JobSpecError(
            "load_in_4bit/load_in_8bit need a CUDA GPU (bitsandbytes), and torch sees none in the train stage",
            hint="use adapter: lora without load_in_4bit/load_in_8bit, or run on a GPU worker whose CUDA torch can use",
        )
    quant = _quantization(cfg, precision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            **pretrained_source(cfg.base_model, cfg),
            config=model_config(cfg),
            dtype=precision.load_dtype,
            attn_implementation=cfg.attention_backend(),
            quantization_config=quant,
            device_map={"": device} if quant is not None or device.type == "cuda" else None,  # straight onto the GPU
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load base_model {cfg.base_model!r}: {e}",
            hint="check base_model and revision_of_model; gated Hub models need HF_TOKEN",
        ) from e
    if model.device != device and quant is None:
        model.to(device)
    prepare_for_training(cfg, model, tokenizer)
    return model


def model_config(cfg: TrainingConfig):
    """The base model's transformers config with the job's `overrides_of_model_config`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        **pretrained_source(cfg.base_model_config or cfg.base_model, cfg), trust_remote_code=cfg.trust_remote_code
    )
    for key, value in (cfg.overrides_of_model_config or {}).items():
        setattr(config, key, value)
    return config


def prepare_for_training(cfg: TrainingConfig, model, tokenizer) -> None:
    """What every base model gets before its adapter: the tokenizer's embeddings, the experts' dispatch,
    no KV cache, and the config's checkpointing."""
    resize_embeddings(cfg, model, tokenizer)
    set_experts_dispatch(model, cfg)
    model.config.use_cache = False  # no KV cache in training
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(cfg, model))
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad


def checkpointing_kwargs(cfg: TrainingConfig, model) -> dict:
    """What `gradient_checkpointing` passes to torch's checkpoint: the config's `gradient_checkpointing_kwargs`,
    else the reentrant kind for supervised training of a dense model in a lone process, the non-reentrant
    kind otherwise.

    Reentrant: the first forward of each layer runs without autograd and builds no graph, which the
    non-reentrant kind builds there and again in the recompute. Where the host is the bound (QLoRA with
    float8 matmuls at 8B, 4 × 2048 tokens on an H200) that was 1.44× the tokens/s in one call, at the same
    memory; where the GPU is, it is the same (docs/benchmarks.md). Non-reentrant elsewhere:
    - under DDP, FSDP and DeepSpeed: their gradient hooks expect each parameter's gradient inside the
      one backward they watch, which a reentrant recompute's nested backward is not;
    - for a MoE model: the router logits its aux loss reads are recorded by hooks during the forward,
      which a reentrant forward runs without autograd, so that loss would reach no weight;
    - for preference and RL objectives: their reference and old-policy passes run without grad in train
      mode, where the reentrant kind warns that no input requires grad;
    - under `torch_compile`: torch.compile traces the non-reentrant kind into its graph and breaks the
      graph at each reentrant one."""
    if cfg.gradient_checkpointing_kwargs:
        return cfg.gradient_checkpointing_kwargs
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return {"use_reentrant": cfg.checkpoints_reentrant(moe=is_moe(model), distributed=distributed)}


def resize_embeddings(cfg: TrainingConfig, model, tokenizer) -> None:
    """Grow the embeddings when tokens were added; new rows must then train (modules_to_save)."""
    current = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= current and not cfg.resize_token_embeddings_to_32x:
        return
    if cfg.adapter and len(tokenizer) > current:
        saved = set(cfg.lora_modules_to_save or [])
        if not {"embed_tokens", "lm_head"} <= saved:
            raise JobSpecError(
                f"the config adds {len(tokenizer) - current} tokens to the vocabulary, but their embeddings would stay "
                f"untrained under {cfg.adapter}",
                hint="add lora_modules_to_save: [embed_tokens, lm_head]",
            )
    model.resize_token_embeddings(
        max(len(tokenizer), current), pad_to_multiple_of=32 if cfg.resize_token_embeddings_to_32x else None
    )
    log.info("embeddings resized to %d rows", model.get_input_embeddings().weight.shape[0])


def compile_if_asked(model, cfg: TrainingConfig, device: torch.device) -> None:
    """torch.compile in place, where the config asks for it on this device (parameter names, state dicts and a
    DDP/FSDP wrapping stay as they are)."""
    if cfg.compiles_model(device.type == "cuda"):
        model.compile(backend=cfg.torch_compile_backend or "inductor", mode=cfg.torch_compile_mode)


def apply_kernel_patches(model, cfg: TrainingConfig) -> list[str]:
    """Model patching lives in ftw_kernels (kernels/ftw_kernels/registry.py) alone; this calls it."""
    applied = list(apply_kernels(model, cfg))
    log.info("kernels applied: %s", ", ".join(applied) or "none")
    return applied

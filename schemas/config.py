"""The training config: axolotl's YAML keys and defaults, typed and immutable.

Keys ftw knows but does not implement, keys that have no effect here, and keys that execute code
live in `schemas/keys.py`; `schemas/validate.py` runs the whole check. Field validators only
check; derived values (the attention backend, the batch arithmetic) are pure methods.
"""

# No `from __future__ import annotations` here: pydantic builds models from real types faster than
# from strings, and these models are built on every `ftw validate` start.
from typing import Any, Literal

from pydantic import ConfigDict, Field

from schemas.base import Frozen
from schemas.datasets import DatasetConfig, PretrainingDatasetConfig
from schemas.rl import EbftConfig, TrlConfig

Auto = Literal["auto"]

LR_SCHEDULERS = (
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "rex",
    "one_cycle",
)
# transformers' experts dispatch (`experts_implementation`); "scattermoe" is ftw's fused LoRA kernel
# (kernels/ftw_kernels/moe.py), registered under that name so axolotl configs carry over unchanged
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "scattermoe")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# axolotl's legacy booleans → attn_implementation (applied in schemas/normalize.py); None: not supported
LEGACY_ATTENTION_FLAGS = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "flex_attention": "flex_attention",
    "eager_attention": "eager",
    "xformers_attention": None,  # not supported: named in the error
    "sage_attention": None,
}
DEEPSPEED_PRESETS = ("zero1", "zero2", "zero3", "zero3_offload", "zero2_offload")
# the JSON files axolotl ships under deepspeed_configs/, read as the preset they are
DEEPSPEED_BUNDLED_FILES = {
    "zero1.json": "zero1",
    "zero1_torch_compile.json": "zero1",
    "zero2.json": "zero2",
    "zero2_torch_compile.json": "zero2",
    "zero3.json": "zero3",
    "zero3_bf16.json": "zero3",
    "zero3_bf16_cpuoffload_all.json": "zero3_offload",
    "zero3_bf16_cpuoffload_params.json": "zero3_offload",
}


class SpecialTokens(Frozen):
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    sep_token: str | None = None
    cls_token: str | None = None
    mask_token: str | None = None
    additional_special_tokens: list[str] | None = None


class FSDPConfig(Frozen):
    """Both spellings axolotl accepts: `fsdp_` prefixed (v1) and plain (v2)."""

    model_config = ConfigDict(extra="allow")


class TrainingConfig(Frozen):
    # ---- model and tokenizer -------------------------------------------------------------------
    base_model: str
    base_model_config: str | None = None
    revision_of_model: str | None = None
    type_of_model: str | None = None
    tokenizer_config: str | None = None
    tokenizer_type: str | None = None
    tokenizer_use_fast: bool = True
    tokenizer_legacy: bool | None = None
    tokenizer_padding_side: Literal["left", "right"] | None = None
    special_tokens: SpecialTokens | None = None
    tokens: list[str] | None = None
    resize_token_embeddings_to_32x: bool = False
    trust_remote_code: bool = False
    overrides_of_model_config: dict[str, Any] | None = None
    low_cpu_mem_usage: bool | None = None
    # ---- adapters ------------------------------------------------------------------------------
    adapter: Literal["lora", "qlora"] | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    lora_r: int = Field(default=8, ge=1, le=4096)
    lora_alpha: int | None = Field(default=None, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: str | list[str] | None = None
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None
    lora_fan_in_fan_out: bool = False
    lora_model_dir: str | None = None
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    peft_use_dora: bool = False
    peft_use_rslora: bool = False
    peft_layers_to_transform: list[int] | None = None
    merge_lora: bool = False
    lora_mlp_kernel: bool | None = None
    lora_qkv_kernel: bool | None = None
    lora_o_kernel: bool | None = None
    # ftw's own key: the frozen base's Linears stored as float8 with per-channel scales, their matmuls as
    # torch._scaled_mm (LoRA on Ada/Hopper; kernels/ftw_kernels/fp8.py). axolotl's `fp8` is torchao's float8
    # training of every Linear, which ftw does not ship.
    fp8_base_weights: bool = False
    # ---- mixture of experts --------------------------------------------------------------------
    lora_target_parameters: str | list[str] | None = None  # 3-D expert tensors, e.g. experts.gate_up_proj
    use_scattermoe: bool | None = None
    experts_implementation: str | None = None
    output_router_logits: bool | None = None
    router_aux_loss_coef: float | None = Field(default=None, ge=0.0)
    # ---- data ----------------------------------------------------------------------------------
    datasets: list[DatasetConfig] | None = None
    test_datasets: list[DatasetConfig] | None = None
    pretraining_dataset: list[PretrainingDatasetConfig] | None = None
    dataset_prepared_path: str | None = None
    dataset_num_proc: int | None = Field(default=None, ge=1)
    shuffle_merged_datasets: bool = True
    dataset_exact_deduplication: bool = False
    val_set_size: float = Field(default=0.0, ge=0.0)
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    default_system_message: str | None = None
    eot_tokens: list[str] | None = None
    train_on_inputs: bool = False
    sequence_len: int = Field(default=512, ge=8, le=1_048_576)
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    min_sample_len: int = Field(default=2, ge=1)
    sample_packing: bool = False
    eval_sample_packing: bool | None = None
    sample_packing_bin_size: int = Field(default=200, ge=1)
    sample_packing_group_size: int = Field(default=100_000, ge=1)
    pad_to_sequence_len: bool | None = None
    skip_prepare_dataset: bool = False
    remove_unused_columns: bool | None = None
    # ---- hyperparameters -----------------------------------------------------------------------
    learning_rate: float = Field(gt=0.0, le=10.0)
    micro_batch_size: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    num_epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    optimizer: str = "adamw_torch_fused"
    optim_args: str | dict[str, Any] | None = None
    lr_scheduler: str = "cosine"
    lr_scheduler_kwargs: dict[str, Any] | None = None
    cosine_min_lr_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    # transformers reads a value below 1 as a fraction of the total steps
    warmup_steps: int | float | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_beta1: float | None = Field(default=None, gt=0.0, lt=1.0)
    adam_beta2: float | None = Field(default=None, gt=0.0, lt=1.0)
    adam_epsilon: float | None = Field(default=None, gt=0.0)
    max_grad_norm: float | None = Field(default=1.0, ge=0.0)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)  # numpy's and torch's seed range
    early_stopping_patience: int | None = Field(default=None, ge=1)
    loss_watchdog_threshold: float | None = None
    loss_watchdog_patience: int | None = None
    # ---- precision and attention ---------------------------------------------------------------
    bf16: bool | Auto = "auto"
    fp16: bool | None = None
    tf32: bool | Auto = "auto"
    bfloat16: bool | None = None
    float16: bool | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool | Literal["offload"] = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    activation_offloading: bool | Literal["legacy", "disk"] = False
    torch_compile: bool | Auto = False
    torch_compile_backend: Literal["inductor", "eager", "aot_eager", "cudagraphs"] | None = None
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = (
        None
    )
    use_kernels: bool | None = None
    # ---- checkpoints ---------------------------------------------------------------------------
    output_dir: str | None = None
    save_strategy: Literal["steps", "epoch", "no", "best"] | None = None
    save_steps: int | float | None = Field(default=None, gt=0)
    saves_per_epoch: int | None = Field(default=None, ge=1)
    save_total_limit: int = Field(default=4, ge=1)
    save_only_model: bool = False
    save_safetensors: bool = True
    save_first_step: bool = False
    resume_from_checkpoint: str | None = None
    auto_resume_from_checkpoints: bool = True
    # ---- eval and logging ----------------------------------------------------------------------
    eval_steps: int | float | None = Field(default=None, gt=0)
    evals_per_epoch: int | None = Field(default=None, ge=0)
    eval_strategy: Literal["steps", "epoch", "no"] | None = None
    logging_steps: int | None = Field(default=None, ge=1)
    use_tensorboard: bool = False
    use_wandb: bool | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_run_id: str | None = None
    wandb_mode: str | None = None
    wandb_log_model: str | None = None
    use_mlflow: bool | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None
    # ---- hub -----------------------------------------------------------------------------------
    hub_model_id: str | None = None
    hub_strategy: str | None = None
    hub_private_repo: bool | None = None
    push_dataset_to_hub: str | None = None
    # ---- distributed ---------------------------------------------------------------------------
    deepspeed: str | dict[str, Any] | None = None
    # ftw's own key: run a deepspeed preset/dict as FSDP2 with the same sharding instead of DeepSpeed's engine
    deepspeed_as_fsdp: bool | None = None
    fsdp: list[str] | str | None = None
    fsdp_config: FSDPConfig | None = None
    fsdp_version: Literal[1, 2] | None = None
    ddp_find_unused_parameters: bool | None = None
    ddp_timeout: int | None = Field(default=None, ge=1)
    # ---- preference and RL training (schemas/rl.py, worker/train/preference.py, grpo.py, ebft*.py) -
    rl: str | None = None
    rl_beta: float | None = Field(default=None, gt=0.0)
    dpo_loss_type: list[str] | None = Field(default=None, min_length=1)
    dpo_label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    orpo_alpha: float | None = Field(default=None, gt=0.0)
    simpo_gamma: float = Field(default=0.5, ge=0.0)
    cpo_alpha: float = Field(default=1.0, ge=0.0)
    kto_desirable_weight: float = Field(default=1.0, gt=0.0)
    kto_undesirable_weight: float = Field(default=1.0, gt=0.0)
    max_prompt_len: int | None = Field(default=None, ge=1)
    trl: TrlConfig | None = None
    ebft: EbftConfig | None = None

    # ---- derived values (pure) -----------------------------------------------------------------
    def batch_shape(self) -> tuple[int, int]:
        """(micro_batch_size, gradient_accumulation_steps); batch_size = their product (schemas.rules checks it)."""
        mbs = self.micro_batch_size or 1
        if self.gradient_accumulation_steps is not None:
            return mbs, self.gradient_accumulation_steps
        return mbs, max(1, (self.batch_size or mbs) // mbs)

    def lora_alpha_value(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r

    def is_full_finetune(self) -> bool:
        return self.adapter is None

    def attention_backend(self) -> str:
        """The attn_implementation the model is loaded with (sdpa unless the config names one)."""
        return self.attn_implementation or "sdpa"

    def lora_unfused_by(self) -> list[str]:
        """The keys that keep this adapter off ftw's fused LoRA kernels (kernels/ftw_kernels/lora.py), which model
        LoRA with or without dropout over a bf16/fp16/fp32, 4-bit or 8-bit base: no DoRA or bias training. PEFT's
        own LoRA layers run instead."""
        if self.adapter not in ("lora", "qlora"):
            return []
        keys = {
            "peft_use_dora": self.peft_use_dora,
            "lora_bias": self.lora_bias != "none",
        }
        return [key for key, unfused in keys.items() if unfused]

    def attention_replaceable(self) -> bool:
        """Whether ftw's varlen attention kernel may stand in for the configured one: sdpa (the default) and
        flash_attention_2 compute the same; eager, flex or flash_attention_3 the user chose for a reason."""
        return self.attention_backend() in ("sdpa", "flash_attention_2")

    def trackers(self) -> list[str]:
        """The experiment trackers the config turns on, in axolotl's terms."""
        wanted = []
        if self.use_wandb or (self.use_wandb is None and self.wandb_project):
            wanted.append("wandb")
        if self.use_mlflow or (self.use_mlflow is None and self.mlflow_tracking_uri):
            wanted.append("mlflow")
        if self.use_tensorboard:
            wanted.append("tensorboard")
        return wanted

    def rl_method(self) -> str | None:
        """dpo, ipo, orpo, kto, simpo or grpo; `rl: dpo` with dpo_loss_type [ipo] is ipo (axolotl's two spellings)."""
        if self.rl == "dpo" and self.dpo_loss_type == ["ipo"]:
            return "ipo"
        return self.rl

    def joins_samples(self) -> bool:
        """Whether an unpacked run may lay each micro-batch's samples end to end in one row, so no layer computes a
        padding token: only the supervised loss, a sum over target tokens (the DPO family's rows are packed already,
        GRPO's prompts are left-padded for generation, EBFT's rows are its documents); pad_to_sequence_len asks for
        padded rows. The trainer joins them where the varlen attention runs (worker/train/batches.padding_free)."""
        return not self.sample_packing and not self.pad_to_sequence_len and self.rl_method() is None

    def joins_steps(self, processes: int) -> bool:
        """Whether a padding-free run (`joins_samples`) also joins each step's samples across its accumulated
        micro-batches (worker/train/batches.joined): with gradient accumulation, in one process or several under DDP or
        FSDP (every rank runs as many passes as the rank that needs most: worker/train/batches.ranks_passes), not under
        DeepSpeed's engine (it counts a step's micro-batches itself), without the MoE router's aux loss (its
        coefficient is shared out per micro-batch: worker/train/moe.py). The trainer and the estimate both ask here."""
        engine = processes > 1 and bool(self.deepspeed) and not self.deepspeed_as_fsdp
        return self.joins_samples() and self.batch_shape()[1] > 1 and not engine and not self.output_router_logits

    def checkpoints_reentrant(self, moe: bool, distributed: bool) -> bool:
        """Whether gradient checkpointing recomputes with torch's reentrant kind: as the config's own
        `gradient_checkpointing_kwargs` say (transformers' default when they omit it: reentrant), else only for
        supervised training of a dense model in one process, not compiled (worker/train/model.checkpointing_kwargs
        says why; the estimate prices the two kinds' recompute differently)."""
        if self.gradient_checkpointing_kwargs:
            return bool(self.gradient_checkpointing_kwargs.get("use_reentrant", True))
        return not moe and not distributed and self.rl_method() is None and self.torch_compile is False

    def compiles_model(self, on_gpu: bool) -> bool:
        """Whether the model runs under torch.compile: `torch_compile: true`, or `auto` on a GPU (the trainer, the
        kernel warm-up and the orchestrator's decision to start it read this one answer)."""
        return self.torch_compile is True or (self.torch_compile == "auto" and on_gpu)

    def rl_beta_value(self) -> float:
        """axolotl's order: trl.beta, rl_beta, orpo_alpha (TRL's ORPO calls λ beta), else TRL's 0.1 (GRPO: 0.0)."""
        for value in (self.trl.beta if self.trl else None, self.rl_beta, self.orpo_alpha):
            if value is not None:
                return value
        return 0.0 if self.rl == "grpo" else 0.1

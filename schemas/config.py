"""The training config: axolotl's YAML keys and defaults, typed and immutable.

Keys ftw knows but does not implement, keys that have no effect here, and keys that execute code
live in `schemas/keys.py`; `schemas/validate.py` runs the whole check. Field validators only
check; derived values (the attention backend, the batch arithmetic) are pure methods.
"""
# No `from __future__ import annotations` here: pydantic builds models from real types faster than
# from strings, and these models are built on every `ftw validate` start.
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field

from schemas.base import Frozen
from schemas.datasets import DatasetConfig, PretrainingDatasetConfig
from schemas.rl import TrlConfig

Auto = Literal["auto"]

OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_4bit", "adamw_torch_8bit", "adamw_bnb_8bit", "adamw_8bit",
    "paged_adamw_8bit", "paged_adamw_32bit", "adamw_hf", "adafactor", "sgd", "adagrad", "lion_8bit",
    "paged_lion_8bit", "rmsprop", "muon",
)
LR_SCHEDULERS = (
    "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "rex",
    "one_cycle",
)
# transformers' experts dispatch (`experts_implementation`); "scattermoe" is ftw's fused LoRA kernel
# (kernels/moe.py), registered under that name so axolotl configs carry over unchanged
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
    "zero1.json": "zero1", "zero1_torch_compile.json": "zero1", "zero2.json": "zero2", "zero2_torch_compile.json": "zero2",
    "zero3.json": "zero3", "zero3_bf16.json": "zero3",
    "zero3_bf16_cpuoffload_all.json": "zero3_offload", "zero3_bf16_cpuoffload_params.json": "zero3_offload",
}


class SpecialTokens(Frozen):
    model_config = ConfigDict(frozen=True, extra="forbid")
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None
    unk_token: Optional[str] = None
    sep_token: Optional[str] = None
    cls_token: Optional[str] = None
    mask_token: Optional[str] = None
    additional_special_tokens: Optional[list[str]] = None


class FSDPConfig(Frozen):
    """Both spellings axolotl accepts: `fsdp_` prefixed (v1) and plain (v2)."""

    model_config = ConfigDict(frozen=True, extra="allow")


class TrainingConfig(Frozen):
    # ---- model and tokenizer -------------------------------------------------------------------
    base_model: str
    base_model_config: Optional[str] = None
    revision_of_model: Optional[str] = None
    type_of_model: Optional[str] = None
    tokenizer_config: Optional[str] = None
    tokenizer_type: Optional[str] = None
    tokenizer_use_fast: bool = True
    tokenizer_legacy: Optional[bool] = None
    tokenizer_padding_side: Optional[Literal["left", "right"]] = None
    special_tokens: Optional[SpecialTokens] = None
    tokens: Optional[list[str]] = None
    resize_token_embeddings_to_32x: bool = False
    trust_remote_code: bool = False
    overrides_of_model_config: Optional[dict[str, Any]] = None
    low_cpu_mem_usage: Optional[bool] = None
    # ---- adapters ------------------------------------------------------------------------------
    adapter: Optional[Literal["lora", "qlora"]] = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    lora_r: int = Field(default=8, ge=1, le=4096)
    lora_alpha: Optional[int] = Field(default=None, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: Optional[Union[str, list[str]]] = None
    lora_target_linear: Optional[bool] = None
    lora_modules_to_save: Optional[list[str]] = None
    lora_fan_in_fan_out: bool = False
    lora_model_dir: Optional[str] = None
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    peft_use_dora: bool = False
    peft_use_rslora: bool = False
    peft_layers_to_transform: Optional[list[int]] = None
    merge_lora: bool = False
    lora_mlp_kernel: Optional[bool] = None
    lora_qkv_kernel: Optional[bool] = None
    lora_o_kernel: Optional[bool] = None
    # ---- mixture of experts --------------------------------------------------------------------
    lora_target_parameters: Optional[Union[str, list[str]]] = None  # 3-D expert tensors, e.g. experts.gate_up_proj
    use_scattermoe: Optional[bool] = None
    experts_implementation: Optional[str] = None
    output_router_logits: Optional[bool] = None
    router_aux_loss_coef: Optional[float] = Field(default=None, ge=0.0)
    # ---- data ----------------------------------------------------------------------------------
    datasets: Optional[list[DatasetConfig]] = None
    test_datasets: Optional[list[DatasetConfig]] = None
    pretraining_dataset: Optional[list[PretrainingDatasetConfig]] = None
    dataset_prepared_path: Optional[str] = None
    dataset_num_proc: Optional[int] = Field(default=None, ge=1)
    shuffle_merged_datasets: bool = True
    dataset_exact_deduplication: bool = False
    val_set_size: float = Field(default=0.0, ge=0.0)
    chat_template: Optional[str] = None
    chat_template_jinja: Optional[str] = None
    default_system_message: Optional[str] = None
    eot_tokens: Optional[list[str]] = None
    train_on_inputs: bool = False
    sequence_len: int = Field(default=512, ge=8, le=1_048_576)
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    min_sample_len: int = Field(default=2, ge=1)
    sample_packing: bool = False
    eval_sample_packing: Optional[bool] = None
    sample_packing_bin_size: int = Field(default=200, ge=1)
    sample_packing_group_size: int = Field(default=100_000, ge=1)
    pad_to_sequence_len: Optional[bool] = None
    skip_prepare_dataset: bool = False
    remove_unused_columns: Optional[bool] = None
    # ---- hyperparameters -----------------------------------------------------------------------
    learning_rate: float = Field(gt=0.0, le=10.0)
    micro_batch_size: Optional[int] = Field(default=None, ge=1)
    gradient_accumulation_steps: Optional[int] = Field(default=None, ge=1)
    batch_size: Optional[int] = Field(default=None, ge=1)
    eval_batch_size: Optional[int] = Field(default=None, ge=1)
    num_epochs: float = Field(default=1.0, gt=0.0)
    max_steps: Optional[int] = Field(default=None, ge=1)
    optimizer: str = "adamw_torch_fused"
    optim_args: Optional[Union[str, dict[str, Any]]] = None
    lr_scheduler: str = "cosine"
    lr_scheduler_kwargs: Optional[dict[str, Any]] = None
    cosine_min_lr_ratio: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    # transformers reads a value below 1 as a fraction of the total steps
    warmup_steps: Optional[Union[int, float]] = Field(default=None, ge=0)
    warmup_ratio: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_beta1: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    adam_beta2: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    adam_epsilon: Optional[float] = Field(default=None, gt=0.0)
    max_grad_norm: Optional[float] = Field(default=1.0, ge=0.0)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)  # numpy's and torch's seed range
    early_stopping_patience: Optional[int] = Field(default=None, ge=1)
    loss_watchdog_threshold: Optional[float] = None
    loss_watchdog_patience: Optional[int] = None
    # ---- precision and attention ---------------------------------------------------------------
    bf16: Union[bool, Auto] = "auto"
    fp16: Optional[bool] = None
    tf32: Union[bool, Auto] = "auto"
    bfloat16: Optional[bool] = None
    float16: Optional[bool] = None
    attn_implementation: Optional[str] = None
    gradient_checkpointing: Union[bool, Literal["offload"]] = False
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None
    activation_offloading: Union[bool, Literal["legacy", "disk"]] = False
    torch_compile: Union[bool, Auto] = False
    torch_compile_backend: Optional[Literal["inductor", "eager", "aot_eager", "cudagraphs"]] = None
    torch_compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    use_kernels: Optional[bool] = None
    # ---- checkpoints ---------------------------------------------------------------------------
    output_dir: Optional[str] = None
    save_strategy: Optional[Literal["steps", "epoch", "no", "best"]] = None
    save_steps: Optional[Union[int, float]] = Field(default=None, gt=0)
    saves_per_epoch: Optional[int] = Field(default=None, ge=1)
    save_total_limit: int = Field(default=4, ge=1)
    save_only_model: bool = False
    save_safetensors: bool = True
    save_first_step: bool = False
    resume_from_checkpoint: Optional[str] = None
    auto_resume_from_checkpoints: bool = True
    # ---- eval and logging ----------------------------------------------------------------------
    eval_steps: Optional[Union[int, float]] = Field(default=None, gt=0)
    evals_per_epoch: Optional[int] = Field(default=None, ge=0)
    eval_strategy: Optional[Literal["steps", "epoch", "no"]] = None
    logging_steps: Optional[int] = Field(default=None, ge=1)
    use_tensorboard: bool = False
    use_wandb: Optional[bool] = None
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None
    wandb_run_id: Optional[str] = None
    wandb_mode: Optional[str] = None
    wandb_log_model: Optional[str] = None
    use_mlflow: Optional[bool] = None
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment_name: Optional[str] = None
    mlflow_run_name: Optional[str] = None
    # ---- hub -----------------------------------------------------------------------------------
    hub_model_id: Optional[str] = None
    hub_strategy: Optional[str] = None
    hub_private_repo: Optional[bool] = None
    push_dataset_to_hub: Optional[str] = None
    # ---- distributed ---------------------------------------------------------------------------
    deepspeed: Optional[Union[str, dict[str, Any]]] = None
    # ftw's own key: run a deepspeed preset/dict as FSDP2 with the same sharding instead of DeepSpeed's engine
    deepspeed_as_fsdp: Optional[bool] = None
    fsdp: Optional[Union[list[str], str]] = None
    fsdp_config: Optional[FSDPConfig] = None
    fsdp_version: Optional[Literal[1, 2]] = None
    ddp_find_unused_parameters: Optional[bool] = None
    ddp_timeout: Optional[int] = Field(default=None, ge=1)
    # ---- preference and RL training (schemas/rl.py, worker/train/preference.py, grpo.py) ----------
    rl: Optional[str] = None
    rl_beta: Optional[float] = Field(default=None, gt=0.0)
    dpo_loss_type: Optional[list[str]] = Field(default=None, min_length=1)
    dpo_label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    orpo_alpha: Optional[float] = Field(default=None, gt=0.0)
    simpo_gamma: float = Field(default=0.5, ge=0.0)
    cpo_alpha: float = Field(default=1.0, ge=0.0)
    kto_desirable_weight: float = Field(default=1.0, gt=0.0)
    kto_undesirable_weight: float = Field(default=1.0, gt=0.0)
    max_prompt_len: Optional[int] = Field(default=None, ge=1)
    trl: Optional[TrlConfig] = None

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

    def rl_method(self) -> Optional[str]:
        """dpo, ipo, orpo, kto, simpo or grpo; `rl: dpo` with dpo_loss_type [ipo] is ipo (axolotl's two spellings)."""
        if self.rl == "dpo" and self.dpo_loss_type == ["ipo"]:
            return "ipo"
        return self.rl

    def rl_beta_value(self) -> float:
        """axolotl's order: trl.beta, rl_beta, orpo_alpha (TRL's ORPO calls λ beta), else TRL's 0.1 (GRPO: 0.0)."""
        for value in (self.trl.beta if self.trl else None, self.rl_beta, self.orpo_alpha):
            if value is not None:
                return value
        return 0.0 if self.rl == "grpo" else 0.1

"""Rules between keys of a training config, as axolotl enforces them.

Each rule names the keys it reads. `cross_field_errors(cfg, broken)` skips a rule when one of
its keys is in `broken` (its value failed its own check, so `cfg` holds a stand-in): that way a
config with a bad learning_rate still gets the adapter rules checked, and no rule fires on a
placeholder. Rules only read; they yield Issues (location, what to change).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

from schemas.config import (
    ATTN_IMPLEMENTATIONS,
    DEEPSPEED_PRESETS,
    EXPERTS_IMPLEMENTATIONS,
    LR_SCHEDULERS,
    TrainingConfig,
)
from schemas.issues import Issue
from schemas.limits import excerpt
from schemas.optimizers import NOT_SHIPPED, OPTIMIZERS

Problems = Iterator[Issue]
RULES: list[tuple[frozenset[str], Callable[[TrainingConfig], Problems]]] = []


def rule(*keys: str) -> Callable[[Callable[[TrainingConfig], Problems]], Callable[[TrainingConfig], Problems]]:
    def register(fn: Callable[[TrainingConfig], Problems]) -> Callable[[TrainingConfig], Problems]:
        RULES.append((frozenset(keys), fn))
        return fn

    return register


def cross_field_errors(cfg: TrainingConfig, broken: Collection[str] = ()) -> list[Issue]:
    """Every rule whose keys all hold real values; `broken` are top-level keys that did not validate."""
    return [p for keys, fn in RULES if not keys & set(broken) for p in fn(cfg)]


# ---- adapters and quantisation ------------------------------------------------------------------
@rule("adapter", "load_in_4bit", "load_in_8bit")
def _quantisation(cfg: TrainingConfig) -> Problems:
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        yield Issue("adapter", "adapter: qlora needs load_in_4bit: true")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.adapter is None:
        key = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
        yield Issue(
            key, f"{key} needs an adapter (lora or qlora); full fine-tuning of a quantised model is not possible"
        )
    if cfg.load_in_4bit and cfg.load_in_8bit:
        yield Issue("load_in_4bit", "load_in_4bit and load_in_8bit are exclusive: keep one")
    if cfg.adapter == "lora" and cfg.load_in_4bit:
        yield Issue("load_in_4bit", "load_in_4bit with adapter: lora — set adapter: qlora")


@rule(
    "fp8_base_weights",
    "adapter",
    "load_in_4bit",
    "load_in_8bit",
    "peft_use_dora",
    "use_kernels",
    "bf16",
    "fp16",
    "float16",
    "torch_compile",
    "fsdp",
    "fsdp_config",
    "deepspeed",
)
def _fp8_base_weights(cfg: TrainingConfig) -> Problems:
    """The float8 base is a frozen LoRA base (bf16-loaded, or 4-bit whose matmuls then run in float8) run by
    ftw's kernels in bf16 on one unsharded GPU copy."""
    if not cfg.fp8_base_weights:
        return
    key, fix = "fp8_base_weights", "remove fp8_base_weights"
    if cfg.adapter not in ("lora", "qlora") or cfg.load_in_8bit:
        what = "full fine-tuning" if cfg.adapter is None else "an 8-bit base (load_in_8bit)"
        yield Issue(
            key,
            f"fp8_base_weights runs a frozen LoRA base's matmuls in float8, not {what}: use adapter: lora "
            f"(float8 storage) or adapter: qlora with load_in_4bit (4-bit storage, float8 matmuls), or {fix}",
        )
    if cfg.peft_use_dora:
        yield Issue(key, f"fp8_base_weights does not work with peft_use_dora (DoRA reads the dense base weight): {fix}")
    if cfg.use_kernels is False:
        yield Issue(
            key, f"fp8_base_weights runs through ftw's kernels, and use_kernels is false: remove use_kernels, or {fix}"
        )
    if cfg.fp16 or cfg.float16 or cfg.bf16 is False:
        yield Issue(key, f"fp8_base_weights computes in bf16 (its fp8 GEMMs write bf16): set bf16: true, or {fix}")
    if cfg.torch_compile is True or cfg.torch_compile == "auto":  # auto compiles on CUDA, where fp8 runs
        yield Issue(key, f"fp8_base_weights is not supported under torch_compile yet: remove torch_compile, or {fix}")
    if cfg.fsdp or cfg.fsdp_config is not None or cfg.deepspeed:
        yield Issue(key, f"fp8_base_weights keeps a whole float8 copy on each GPU (no fsdp/deepspeed sharding): {fix}")


@rule("adapter", "lora_model_dir", "merge_lora")
def _needs_adapter(cfg: TrainingConfig) -> Problems:
    if cfg.lora_model_dir and cfg.adapter is None:
        yield Issue("lora_model_dir", "lora_model_dir needs adapter: lora or qlora")
    if cfg.merge_lora and cfg.adapter is None:
        yield Issue("merge_lora", "merge_lora needs an adapter (full fine-tuning already produces a merged model)")


UNFUSED_BECAUSE = {
    "peft_use_dora": "DoRA has no fused kernel",
    "lora_bias": "a trained bias has no fused kernel; lora_bias: none",
}


def unfused_lora_warnings(cfg: TrainingConfig) -> list[Issue]:
    """Where an adapter runs off ftw's fused LoRA kernels though the kernels are on: the run is right, only slower
    and with more activation memory (PEFT's layers keep each projection's input and its LoRA product apart)."""
    if cfg.use_kernels is False:
        return []
    return [
        Issue(
            key,
            f"{key}: {_yaml(getattr(cfg, key))} keeps this LoRA off ftw's fused LoRA kernels (on the model families "
            "that have them, docs/config.md: Kernels): PEFT's LoRA layers run q/k/v/o and the MLP instead, slower and "
            f"with more activation memory ({UNFUSED_BECAUSE[key]})",
        )
        for key in cfg.lora_unfused_by()
    ]


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---- mixture of experts -------------------------------------------------------------------------
# experts implementations transformers registers that need packages or hardware ftw does not ship
UNSHIPPED_EXPERTS = {"sonicmoe": "the sonic-moe package", "deepgemm": "the deep_gemm package"}


@rule("adapter", "lora_target_parameters", "lora_dropout", "peft_use_dora", "lora_bias", "lora_fan_in_fan_out")
def _target_parameters(cfg: TrainingConfig) -> Problems:
    """PEFT's LoRA on raw parameters cannot factor dropout, DoRA, a bias or fan_in_fan_out out of W + BA."""
    if not cfg.lora_target_parameters:
        return
    if cfg.adapter is None:
        yield Issue("lora_target_parameters", "lora_target_parameters needs adapter: lora or qlora")
    if cfg.lora_dropout:
        yield Issue(
            "lora_dropout",
            "LoRA on parameters (lora_target_parameters) does not work with lora_dropout: set lora_dropout: 0",
        )
    for key, on in (
        ("peft_use_dora", cfg.peft_use_dora),
        ("lora_bias", cfg.lora_bias != "none"),
        ("lora_fan_in_fan_out", cfg.lora_fan_in_fan_out),
    ):
        if on:
            yield Issue(
                key, f"{key} does not work with LoRA on parameters (lora_target_parameters): remove one of them"
            )


@rule("experts_implementation", "use_scattermoe", "use_kernels")
def _experts(cfg: TrainingConfig) -> Problems:
    impl = cfg.experts_implementation
    if impl in UNSHIPPED_EXPERTS:
        yield Issue(
            "experts_implementation",
            f"experts_implementation {impl!r} is not supported by ftw (it needs {UNSHIPPED_EXPERTS[impl]}); "
            f"use one of {', '.join(EXPERTS_IMPLEMENTATIONS)}",
            "unsupported",
        )
    elif impl is not None and impl not in EXPERTS_IMPLEMENTATIONS:
        yield Issue(
            "experts_implementation",
            f"experts_implementation {impl!r} is not known; use one of {', '.join(EXPERTS_IMPLEMENTATIONS)}",
        )
    if cfg.use_scattermoe and impl not in (None, "scattermoe"):
        yield Issue(
            "use_scattermoe",
            f"use_scattermoe: true asks for experts_implementation scattermoe, but it is {impl!r}: keep one",
        )
    if (cfg.use_scattermoe or impl == "scattermoe") and cfg.use_kernels is False:
        yield Issue(
            "use_kernels",
            "use_kernels: false switches the ScatterMoE kernel off, but use_scattermoe / experts_implementation asks "
            "for it: keep one",
        )


@rule("output_router_logits", "router_aux_loss_coef")
def _router_loss(cfg: TrainingConfig) -> Problems:
    if cfg.router_aux_loss_coef is not None and not cfg.output_router_logits:
        yield Issue(
            "router_aux_loss_coef",
            "router_aux_loss_coef has no effect without output_router_logits: true (the router "
            "auxiliary loss is only computed then): add output_router_logits: true or remove it",
        )


# ---- batch arithmetic and schedule --------------------------------------------------------------
@rule("micro_batch_size", "gradient_accumulation_steps", "batch_size")
def _batch(cfg: TrainingConfig) -> Problems:
    """batch_size = micro_batch_size × gradient_accumulation_steps: give micro_batch_size and one of the others."""
    if cfg.batch_size is None:
        return
    if cfg.gradient_accumulation_steps is not None:
        yield Issue(
            "batch_size",
            "gradient_accumulation_steps and batch_size are exclusive: give micro_batch_size and one of them",
        )
    elif cfg.micro_batch_size is None:
        yield Issue(
            "batch_size",
            "batch_size needs micro_batch_size (gradient_accumulation_steps = batch_size / micro_batch_size): add "
            "micro_batch_size",
        )
    elif cfg.batch_size % cfg.micro_batch_size:
        yield Issue(
            "batch_size", f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size}"
        )


@rule("warmup_steps", "warmup_ratio")
def _warmup(cfg: TrainingConfig) -> Problems:
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        yield Issue("warmup_steps", "warmup_steps and warmup_ratio are exclusive: keep one")
    steps = cfg.warmup_steps
    if isinstance(steps, float) and steps >= 1 and not steps.is_integer():
        yield Issue("warmup_steps", f"warmup_steps {steps} is neither a whole number of steps nor a fraction below 1")


@rule("save_steps", "saves_per_epoch")
def _saves(cfg: TrainingConfig) -> Problems:
    if cfg.save_steps is not None and cfg.saves_per_epoch is not None:
        yield Issue("save_steps", "save_steps and saves_per_epoch are exclusive: keep one")


@rule("eval_steps", "evals_per_epoch")
def _evals(cfg: TrainingConfig) -> Problems:
    if cfg.eval_steps is not None and cfg.evals_per_epoch is not None:
        yield Issue("eval_steps", "eval_steps and evals_per_epoch are exclusive: keep one")


@rule("optimizer")
def _optimizer(cfg: TrainingConfig) -> Problems:
    if cfg.optimizer in NOT_SHIPPED:
        yield Issue(
            "optimizer",
            f"optimizer {excerpt(cfg.optimizer)} is not supported by ftw; use one of {', '.join(OPTIMIZERS)}",
            "unsupported",
        )
    elif cfg.optimizer not in OPTIMIZERS:
        yield Issue("optimizer", f"optimizer {excerpt(cfg.optimizer)} is not known; use one of {', '.join(OPTIMIZERS)}")


@rule("lr_scheduler")
def _scheduler(cfg: TrainingConfig) -> Problems:
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        yield Issue(
            "lr_scheduler",
            f"lr_scheduler {excerpt(cfg.lr_scheduler)} is not known; use one of {', '.join(LR_SCHEDULERS)}",
        )


# ---- data ---------------------------------------------------------------------------------------
@rule("datasets", "pretraining_dataset")
def _has_data(cfg: TrainingConfig) -> Problems:
    if not cfg.datasets and not cfg.pretraining_dataset:
        yield Issue("datasets", "datasets (or pretraining_dataset) is required: add at least one dataset")


@rule("chat_template_jinja")
def _jinja_is_text(cfg: TrainingConfig) -> Problems:
    if cfg.chat_template_jinja and cfg.chat_template_jinja.strip().endswith((".jinja", ".j2")):
        yield Issue(
            "chat_template_jinja",
            "chat_template_jinja must be the template text, not a file path (files are not read from a job)",
        )


@rule("val_set_size")
def _val_set_size(cfg: TrainingConfig) -> Problems:
    if cfg.val_set_size >= 1.0 and cfg.val_set_size != int(cfg.val_set_size):
        yield Issue("val_set_size", "val_set_size is a fraction in [0, 1) or a whole number of rows")


# ---- precision, attention, distributed ----------------------------------------------------------
@rule("bf16", "fp16")
def _precision(cfg: TrainingConfig) -> Problems:
    if cfg.bf16 is True and cfg.fp16:
        yield Issue("bf16", "bf16 and fp16 are exclusive: keep one")


@rule("attn_implementation")
def _attention(cfg: TrainingConfig) -> Problems:
    if cfg.attn_implementation is not None and cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        yield Issue(
            "attn_implementation",
            f"attn_implementation {excerpt(cfg.attn_implementation)} is not supported by ftw; use one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}",
            "unsupported",
        )


@rule("fsdp", "fsdp_config", "deepspeed")
def _distributed(cfg: TrainingConfig) -> Problems:
    if (cfg.fsdp or cfg.fsdp_config is not None) and cfg.deepspeed:
        yield Issue("fsdp" if cfg.fsdp else "fsdp_config", "fsdp and deepspeed are exclusive: keep one")


@rule("deepspeed", "deepspeed_as_fsdp")
def _deepspeed(cfg: TrainingConfig) -> Problems:
    if isinstance(cfg.deepspeed, str) and cfg.deepspeed not in DEEPSPEED_PRESETS:
        yield Issue(
            "deepspeed",
            (
                f"deepspeed {excerpt(cfg.deepspeed)}: give a preset name ({', '.join(DEEPSPEED_PRESETS)}) or the "
                "config as a dict; config files are not read from a job (they would read files on the worker)"
            ),
            "unsupported",
        )
    if isinstance(cfg.deepspeed, dict):
        for section, keys in (
            ("optimizer", "optimizer, learning_rate, weight_decay, adam_beta1/2"),
            ("scheduler", "lr_scheduler, warmup_steps"),
        ):
            if section in cfg.deepspeed:
                yield Issue(
                    f"deepspeed.{section}",
                    f"ftw builds the {section} from its own keys and would not use this one: remove it and set {keys}",
                )
    if cfg.deepspeed_as_fsdp and not cfg.deepspeed:
        yield Issue(
            "deepspeed_as_fsdp",
            "deepspeed_as_fsdp runs a deepspeed config as FSDP2, and there is no deepspeed key: remove it, or use "
            "fsdp_config",
        )

"""The one patch registry: which kernels a model gets, decided from its family and the config.

Patches replace `forward` on module *instances* of the given model (never on transformers
classes), so another model in the same process is untouched. Each family entry names the
transformers versions whose forwards the patched ones were verified against; on any other
version nothing is applied and the log says why.

Switches (axolotl's names): `use_kernels` (None: on when the model is on CUDA; true: force, e.g.
on CPU under TRITON_INTERPRET; false: off), and per LoRA projection `lora_mlp_kernel`,
`lora_qkv_kernel`, `lora_o_kernel` (None: follow use_kernels; false: off).

QLoRA (`adapter: qlora`, `load_in_4bit`) takes the same fused LoRA functions: their base weights are
bitsandbytes 4-bit tensors, dequantised by one Triton kernel into a cache bounded by one decoder layer's weights
(kernels/ftw_kernels/qlora.py) and never kept dense for backward; the applied list then names `dequant_4bit` after
the fused projections. An 8-bit base (`load_in_8bit`) takes the same cache (`dequant_8bit`).

`fp8_base_weights: true` stores the frozen Linears of the attention and MLP modules as float8 with per-channel
scales and runs their matmuls as `torch._scaled_mm` (kernels/ftw_kernels/fp8.py): the applied list names
`fp8_base`. It needs the family's patches; where they do not apply, `apply_kernels` refuses instead of
training a bf16 base the config did not ask for.

MoE models (any family whose experts use transformers' `@use_experts_implementation`) get ftw's
ScatterMoE LoRA experts (kernels/ftw_kernels/moe.py) through transformers' experts registry, unless the config
names another experts_implementation; `use_scattermoe: true` / `experts_implementation: scattermoe`
ask for it explicitly (on CPU it runs only under TRITON_INTERPRET; elsewhere grouped_mm serves).
The MoE families of FAMILIES (qwen3_moe, olmoe, mixtral) get the dense patches too (norms, rope,
fused LoRA attention projections, varlen attention, the fused loss with the router's aux loss).
On CUDA their MoE blocks then replay as CUDA graphs (kernels/ftw_kernels/moe_graphs.py: `moe_graphs`)
when micro-batches keep one layout (sample_packing, or pad_to_sequence_len) and nothing reads the
blocks from outside (no checkpointing or offloading, no router aux loss, no torch_compile, no
DeepSpeed or FSDP, one process); FTW_MOE_GRAPHS=0 turns that off.

The dense families' decoder layers (llama, mistral, qwen2, qwen3) run their residual stream through the norms
(`residual_fold`): the post-attention norm's kernel writes the attention's add, and both norms add the stream's
grad in their backward (kernels/ftw_kernels/rmsnorm.py `rms_norm_and_residual`); 1.006× the step on an H200.

The frozen weights of the fused q, k, v and gate, up groups are re-laid with their adapters beside them
(kernels/ftw_kernels/bordered.py: `bordered_qkv`, `bordered_mlp`): plain frozen weights in one process only, not
under torch_compile; +0.3–0.8% of the training step on an H200. `FTW_BORDERED_LORA=0` turns that off.

Wherever fp32 matmuls may run in TF32 (the trainer sets that from `tf32` before it loads the model), every model's
standard rotary modules compute their angles without a GEMM (kernels/ftw_kernels/rope_angles.py: `rope_angles`),
whatever `use_kernels` says: TF32 would round the inverse frequencies and, past 2048, the positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ftw.kernels")

# transformers major.minor whose modeling code the patched forwards reproduce
VERIFIED_TRANSFORMERS = ("5.17",)


@dataclass(frozen=True)
class Family:
    """What the patches need to know of one model family's modeling code."""

    norm_class: str  # RMSNorm class name
    mlp_class: str | None  # dense gated-MLP class name (silu); None: the family's MLPs are all experts
    attention_class: str
    # RMSNorm on q and k before rope: "head" over each head (Qwen3), "projection" over the whole q
    # and k projections before the split into heads (OLMoE)
    qk_norm: str | None = None
    window_in_config: bool = False  # Mistral reads sliding_window off the config, Qwen2/3 off the layer
    # a pre-norm decoder layer (norm, attention, add; norm, dense MLP, add) whose residual stream the norms carry
    # (patches._decoder_layer_forward); None: the family's layers are not all of that shape
    decoder_class: str | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaRMSNorm", "LlamaMLP", "LlamaAttention", decoder_class="LlamaDecoderLayer"),
    "mistral": Family(
        "MistralRMSNorm", "MistralMLP", "MistralAttention", window_in_config=True, decoder_class="MistralDecoderLayer"
    ),
    "qwen2": Family("Qwen2RMSNorm", "Qwen2MLP", "Qwen2Attention", decoder_class="Qwen2DecoderLayer"),
    "qwen3": Family("Qwen3RMSNorm", "Qwen3MLP", "Qwen3Attention", qk_norm="head", decoder_class="Qwen3DecoderLayer"),
    "qwen3_moe": Family("Qwen3MoeRMSNorm", "Qwen3MoeMLP", "Qwen3MoeAttention", qk_norm="head"),
    "olmoe": Family("OlmoeRMSNorm", None, "OlmoeAttention", qk_norm="projection", window_in_config=True),
    "mixtral": Family("MixtralRMSNorm", None, "MixtralAttention", window_in_config=True),
}


def _switch(value: bool | None, default: bool) -> bool:
    return default if value is None else bool(value)


def _unwrap(model: Any) -> Any:
    """The transformers *ForCausalLM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_kernels(model: Any, config: Any) -> list[str]:
    """Patch `model` (a PeftModel after get_peft_model, or a plain HF causal LM) in place.

    Returns the names of the patches applied, in order; an empty list when the family, the
    transformers version or the switches rule them out (the reason is logged). RuntimeError when
    `fp8_base_weights` is asked for and the family's patches do not apply.
    """
    applied = _apply(model, config) + _rope_angles(model)
    if config.fp8_base_weights and "fp8_base" not in applied:
        raise RuntimeError(
            "fp8_base_weights: true runs the frozen base through ftw's fused kernels, which do not apply to this "
            f"model (applied: {', '.join(applied) or 'none'}; the log says why): remove fp8_base_weights, or use a "
            f"{'/'.join(FAMILIES)} model with use_kernels not false"
        )
    return applied


def _unverified_transformers() -> str | None:
    """The installed transformers' version when the patched forwards were not verified against it, else None."""
    import transformers

    verified = ".".join(transformers.__version__.split(".")[:2]) in VERIFIED_TRANSFORMERS
    return None if verified else transformers.__version__


def _rope_angles(model: Any) -> list[str]:
    """Exact rotary angles wherever fp32 matmuls may run in TF32, whatever `use_kernels` says: it mends the model's
    numbers rather than speeding them (kernels/ftw_kernels/rope_angles.py)."""
    from ftw_kernels import rope_angles

    if not rope_angles.fp32_matmuls_may_use_tf32():
        return []
    version = _unverified_transformers()
    if version is not None:
        log.warning(
            "fp32 matmuls may run in TF32, and transformers %s is not one ftw's exact rotary angles were verified "
            "against: positions past 2048 may round (tf32: false avoids it)",
            version,
        )
        return []
    return rope_angles.install(_unwrap(model))


def _apply(model: Any, config: Any) -> list[str]:
    base = _unwrap(model)
    model_type = getattr(base.config, "model_type", None)
    family = FAMILIES.get(model_type)
    on_cuda = next(base.parameters()).is_cuda
    asked_moe = bool(config.use_scattermoe) or config.experts_implementation == "scattermoe"
    enabled = _switch(config.use_kernels, on_cuda)  # the dense families' patches
    if not (enabled or asked_moe):
        log.info("kernels: off (%s)", "use_kernels: false" if config.use_kernels is False else "model not on CUDA")
        return []
    version = _unverified_transformers()
    if version is not None:
        log.warning(
            "kernels: not applied: transformers %s is not one the patches were verified against (%s)",
            version,
            ", ".join(VERIFIED_TRANSFORMERS),
        )
        return []
    applied: list[str] = []
    if config.experts_implementation in (None, "scattermoe"):
        import ftw_kernels.patches as patches  # the submodule, not the package (whose __init__ imports this one)

        applied += patches.install_experts(model)
    if enabled:
        applied += _dense_patches(base, family, config)
    else:
        log.info("kernels: no dense ones for %s: use_kernels is off here", model_type)
    if on_cuda and set(applied) & MOE_EXPERTS:
        applied += _moe_graphs(model, config)
    if applied:
        log.info("kernels applied to %s: %s", model_type, ", ".join(applied))
    return applied


MOE_EXPERTS = {"grouped_mm_lora", "grouped_mm", "scattermoe_lora", "scattermoe"}  # install_experts' names
MOE_GRAPHS_ENV = "FTW_MOE_GRAPHS"  # "0": MoE blocks never replayed as CUDA graphs


def _moe_graphs(model: Any, config: Any) -> list[str]:
    """The MoE blocks replayed as CUDA graphs (kernels/ftw_kernels/moe_graphs.py) where a replay is the
    same computation and the micro-batches keep one layout; [] with the reason logged otherwise."""
    import os

    import torch

    mbs, seq = config.micro_batch_size or 1, config.sequence_len
    shape = (1, mbs * seq) if config.sample_packing else (mbs, seq) if config.pad_to_sequence_len else None
    recompute_or_offload = config.activation_offloading or config.gradient_checkpointing
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    refusals = (
        (os.environ.get(MOE_GRAPHS_ENV) == "0", f"{MOE_GRAPHS_ENV}=0"),
        (recompute_or_offload, "gradient checkpointing or activation offloading is on"),
        (
            config.output_router_logits or getattr(_unwrap(model).config, "output_router_logits", False),
            "output_router_logits: the aux loss reads the router through hooks",
        ),
        (config.torch_compile, "torch_compile is on"),
        (distributed, "several processes train"),
        # their hooks gather, reduce or partition parameters around each module's call
        (config.deepspeed or config.fsdp or config.fsdp_config, "DeepSpeed or FSDP wraps the model"),
        (shape is None, "micro-batches change shape (neither sample_packing nor pad_to_sequence_len)"),
    )
    reason = next((why for refused, why in refusals if refused), None)
    if reason is not None:
        log.info("kernels: MoE blocks not replayed as CUDA graphs: %s", reason)
        return []
    from ftw_kernels import moe_graphs

    return ["moe_graphs"] if moe_graphs.install(model, shape) is not None else []


def _dense_patches(base: Any, family: Family | None, config: Any) -> list[str]:
    """The family's norm, MLP, attention and loss patches, as far as the config allows."""
    import torch

    model_type = getattr(base.config, "model_type", None)
    if family is None:
        log.info("kernels: no dense ones for model_type %r (families: %s)", model_type, ", ".join(FAMILIES))
        return []
    if getattr(base.config, "hidden_act", "silu") != "silu":
        log.info("kernels: no dense ones: hidden_act %r is not silu", base.config.hidden_act)
        return []

    import ftw_kernels.patches as patches
    import ftw_kernels.qlora as qlora

    on_cuda = next(base.parameters()).is_cuda
    lora_ok = config.adapter in ("lora", "qlora") and not config.lora_unfused_by()
    wanted = {
        "lora_mlp": lora_ok and _switch(config.lora_mlp_kernel, True),
        "lora_qkv": lora_ok and _switch(config.lora_qkv_kernel, True),
        "lora_o": lora_ok and _switch(config.lora_o_kernel, True),
        # flash-attention kernels: CUDA, half precision, no attention dropout
        "varlen_attention": on_cuda
        and base.dtype in (torch.bfloat16, torch.float16)
        and not getattr(base.config, "attention_dropout", 0.0)
        and config.attention_replaceable()
        and patches.varlen_available(),
    }
    applied = patches.apply_family(base, family, wanted)
    if {"lora_mlp", "lora_qkv", "lora_o"} & set(applied):
        bits = {4 if qlora.is_4bit(p) else 8 for p in base.parameters() if qlora.is_quantised(p)}
        if bits:
            qlora.keep_recent(_largest_layer_dense_bytes(base))
            applied += [f"dequant_{n}bit" for n in sorted(bits)]
    if config.fp8_base_weights and patches.install_fp8_base(base, family):
        applied.append("fp8_base")
    if {"lora_mlp", "lora_qkv"} & set(applied) and _bordered_refusal(config, applied) is None:
        applied += patches.border_layers(base)
    return applied


def _bordered_refusal(config: Any, applied: list[str]) -> str | None:
    """Why the fused LoRA groups' weights are not bordered (kernels/ftw_kernels/bordered.py), or None."""
    import torch

    from ftw_kernels import bordered

    refusals = (
        (not bordered.wanted(), f"{bordered.ENV} is 0"),
        (config.lora_dropout, "lora_dropout: the rank-r terms read the dropped input, not the norm's"),
        ({"fp8_base", "dequant_4bit", "dequant_8bit"} & set(applied), "the base weights are quantised"),
        (config.torch_compile, "torch_compile is on"),
        (config.deepspeed or config.fsdp or config.fsdp_config, "DeepSpeed or FSDP shards the weights"),
        (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1, "several processes train"),
    )
    reason = next((why for refused, why in refusals if refused), None)
    if reason is not None and bordered.wanted():
        log.info("kernels: LoRA weights not bordered: %s", reason)
    return reason


def _largest_layer_dense_bytes(base: Any) -> int:
    """The dequantised bytes of the decoder layer (`….layers.<i>.…`) with the most quantised weights: the bound of
    QLoRA's cache of recent weights (kernels/ftw_kernels/qlora.py), so that a checkpointed layer's backward finds
    the weights its recomputed forward dequantised."""
    import re

    import ftw_kernels.qlora as qlora

    per_layer: dict[str, int] = {}
    for name, p in base.named_parameters():
        found = re.search(r"\.layers\.(\d+)\.", f".{name}")
        if found:
            per_layer[found.group(1)] = per_layer.get(found.group(1), 0) + qlora.dense_bytes(p)
    return max(per_layer.values(), default=0)

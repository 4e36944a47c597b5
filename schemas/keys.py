"""The closed registries of axolotl keys that are not plain typed fields of TrainingConfig.

- ALIASES: old names mapped onto the current field (axolotl accepts both).
- NO_EFFECT: accepted, but ftw decides this itself (a warning says so).
- UNSUPPORTED: real axolotl features ftw does not implement: an error naming the key when set
  to anything but its "off" value.
- GATED: keys that execute code or read files on the worker; refused unless the operator sets
  the environment variable named here.
"""
from __future__ import annotations

ALIASES = {
    "model_config": "overrides_of_model_config",
    "model_type": "type_of_model",
    "model_revision": "revision_of_model",
    "adam_eps": "adam_epsilon",
    "dataset_processes": "dataset_num_proc",
    "torch_dtype": None,  # folded into bf16/fp16 by normalize
}

NO_EFFECT = {
    "strict": "ftw is always strict about unknown keys (it warns)",
    "debug": "use `ftw preprocess` to inspect tokenised rows",
    "local_rank": "set by the launcher",
    "ddp": "ftw launches one process per visible GPU itself",
    "device_map": "ftw places the model itself",
    "processor_type": "ftw trains text models only; the tokenizer is loaded with AutoTokenizer",
    "hf_use_auth_token": "the Hub token comes from the endpoint environment or job credentials",
    "experimental_skip_move_to_device": "ftw places the model itself",
    "eval_table_size": "completion tables are not logged",
    "eval_max_new_tokens": "completion tables are not logged",
    "eval_causal_lm_metrics": "only loss and perplexity are logged",
    "do_causal_lm_eval": "only loss and perplexity are logged",
    "flash_optimum": "not needed on current torch",
    "max_packed_sequence_len": "packing capacity is micro_batch_size × sequence_len",
    "wandb_watch": "gradient watching is not enabled",
}

# key -> why; set to a value other than None/False/0/[] it is an error.
UNSUPPORTED = {
    "gptq": "GPTQ-quantised base models", "gptq_groupsize": "GPTQ-quantised base models",
    "gptq_model_v1": "GPTQ-quantised base models", "gptq_disable_exllama": "GPTQ-quantised base models",
    "qat": "quantisation-aware training", "llmcompressor": "llm-compressor sparsity",
    "reward_model": "reward-model training", "process_reward_model": "process reward models",
    "num_labels": "sequence/token classification heads",
    "context_parallel_size": "context parallelism", "tensor_parallel_size": "tensor parallelism",
    "expert_parallel_size": "expert parallelism", "dp_shard_size": "explicit device-mesh sizes",
    "dp_replicate_size": "explicit device-mesh sizes", "sequence_parallel_degree": "sequence parallelism",
    "use_ray": "Ray launching", "ray_num_workers": "Ray launching",
    "unfrozen_parameters": "partial freezing by name", "lisa_n_layers": "LISA layer sampling",
    "lisa_step_interval": "LISA layer sampling", "lisa_layers_attribute": "LISA layer sampling",
    "relora": "ReLoRA", "relora_steps": "ReLoRA",
    "diffusion": "diffusion language models", "ebft": "energy-based fine-tuning",
    "vllm": "vLLM-backed RL generation", "trl": "TRL RL trainers",
    "use_swanlab": "SwanLab logging", "trackio_project_name": "Trackio logging",
    "use_otel_metrics": "OpenTelemetry metrics", "tiled_mlp": "tiled MLP",
    "quantize_moe_experts": "MoE expert quantisation", "use_scattermoe": "ScatterMoE kernels",
    "use_sonicmoe": "SonicMoE kernels", "experts_implementation": "custom MoE experts",
    "llama4_linearized_experts": "Llama-4 linearised experts",
    "use_glm_dsa_kernels": "GLM DSA kernels", "use_dsv4_kernels": "DeepSeek-V4 kernels",
    "dsv4_fp4_grouped_mode": "DeepSeek-V4 FP4 kernels", "model_quantization_config": "custom quantisation configs",
    "model_quantization_config_kwargs": "custom quantisation configs", "nvfp4_merge_aware": "NVFP4 training",
    "tokenizer_use_mistral_common": "mistral-common tokenizers", "freeze_mm_modules": "multimodal models",
    "lora_target_parameters": "LoRA on raw parameters (MoE experts)", "cut_cross_entropy": "the cut-cross-entropy plugin",
    "liger_rms_norm": "Liger kernels (ftw ships its own, see kernels/)", "liger_glu_activation": "Liger kernels (ftw ships its own)",
    "liger_layer_norm": "Liger kernels (ftw ships its own)", "liger_rope": "Liger kernels (ftw ships its own)",
    "liger_fused_linear_cross_entropy": "Liger kernels (ftw ships its own)", "liger_rms_norm_gated": "Liger kernels",
    "flash_attn_cross_entropy": "flash-attn's fused cross-entropy", "flash_attn_rms_norm": "flash-attn's RMSNorm",
    "flash_attn_fuse_mlp": "flash-attn's fused MLP", "fused_attn_kernel": "custom fused attention",
    "gemma4_hybrid_attn_impl": "Gemma-4 hybrid attention", "flex_attn_compile_kwargs": "flex-attention compile options",
    "center_rewards_coefficient": "reward-model training", "bnb_config_kwargs": "custom bitsandbytes options",
    "base_model_ignore_patterns": "download filters", "mean_resizing_embeddings": "mean-resized embeddings",
    "multipack_real_batches": "real-batch multipack", "curriculum_sampling": "curriculum sampling",
    "xformers_attention": "xFormers attention (use attn_implementation: sdpa or flash_attention_2)",
    "sage_attention": "SageAttention (use attn_implementation: sdpa or flash_attention_2)",
    "s2_attention": "shifted-sparse attention", "deepcompile": "DeepSpeed deepcompile",
}

# key -> environment variable that allows it
GATED = {
    "plugins": "FTW_ALLOW_PLUGINS",
    "torchdistx_path": "FTW_ALLOW_PLUGINS",
    "trust_remote_code": "FTW_ALLOW_REMOTE_CODE",
}

# prefixes of keys that belong to an unsupported integration (swanlab_*, trackio_*, ...)
UNSUPPORTED_PREFIXES = {
    "swanlab_": "SwanLab logging",
    "trackio_": "Trackio logging",
    "otel_": "OpenTelemetry metrics",
    "expert_parallel_": "expert parallelism",
    "comet_": "Comet logging",
}


def is_off(value: object) -> bool:
    """Keys set to their 'off' value are harmless even when unsupported."""
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""

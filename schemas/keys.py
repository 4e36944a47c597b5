"""The closed registries of axolotl keys that are not plain typed fields of TrainingConfig.

- ALIASES: old names mapped onto the current field (axolotl accepts both).
- NO_EFFECT: accepted, but ftw decides this itself (a warning says so).
- KERNEL_SWITCHES: other projects' fused kernels (Liger, ...): accepted; set on, a warning says
  which of ftw's own kernels does the work, or that the model's own code runs.
- UNSUPPORTED: real axolotl features ftw does not implement: an error naming the key when set
  to anything but its "off" value.
- GATED: keys that execute code or read files on the worker; refused unless the operator sets
  the environment variable named here.
- DATASET_*: the same for the keys of one `datasets:` entry.

Every key of axolotl's schema (commit 067b021c) is in one of these or is a typed field; keys
outside all of them are unknown and warned about with the closest known key.
"""

from __future__ import annotations


def _group(reason: str, keys: str) -> dict[str, str]:
    return dict.fromkeys(keys.split(), reason)


ALIASES = {
    "model_config": "overrides_of_model_config",
    "model_type": "type_of_model",
    "model_revision": "revision_of_model",
    "adam_eps": "adam_epsilon",
    "dataset_processes": "dataset_num_proc",
    "evaluation_strategy": "eval_strategy",
    "dpo_beta": "rl_beta",
}
# torch_dtype is folded into bf16/fp16 by schemas.normalize; the legacy attention booleans
# (flash_attention, sdp_attention, ...) into attn_implementation (schemas.config).
TORCH_DTYPE_KEY = "torch_dtype"

NO_EFFECT = {
    "strict": "ftw is always strict about unknown keys (it warns)",
    "debug": "use `ftw preprocess` to inspect tokenised rows",
    "local_rank": "set by the launcher",
    "world_size": "set by the launcher",
    "ddp": "ftw launches one process per visible GPU itself",
    "device_map": "ftw places the model itself",
    "device": "ftw places the model itself",
    "max_memory": "ftw places the model itself",
    "gpu_memory_limit": "ftw places the model itself",
    "lora_on_cpu": "ftw places the model itself",
    "processor_type": "ftw trains text models only; the tokenizer is loaded with AutoTokenizer",
    "processor_kwargs": "ftw trains text models only",
    "hf_use_auth_token": "the Hub token comes from the endpoint environment or job credentials",
    "experimental_skip_move_to_device": "ftw places the model itself",
    "eval_table_size": "completion tables are not logged",
    "eval_max_new_tokens": "completion tables are not logged",
    "eval_causal_lm_metrics": "only loss and perplexity are logged",
    "do_causal_lm_eval": "only loss and perplexity are logged",
    "flash_optimum": "not needed on current torch",
    "max_packed_sequence_len": "packing capacity is micro_batch_size × sequence_len",
    "wandb_watch": "gradient watching is not enabled",
    "include_tkps": "tokens/s is always reported in progress events",
    "include_tokens_per_second": "tokens/s is always reported in progress events",
    "is_preprocess": "ftw runs preprocess as its own stage",
    "is_falcon_derived_model": "the architecture is read from the model config",
    "is_llama_derived_model": "the architecture is read from the model config",
    "is_mistral_derived_model": "the architecture is read from the model config",
    "is_qwen_derived_model": "the architecture is read from the model config",
    "axolotl_config_path": "the config comes from the job",
    "capabilities": "ftw probes the GPU itself",
    "env_capabilities": "ftw probes the environment itself",
    "dataloader_num_workers": "ftw sizes the data loader itself",
    "dataloader_pin_memory": "ftw sizes the data loader itself",
    "dataloader_prefetch_factor": "ftw sizes the data loader itself",
    "dataloader_drop_last": "ftw sizes the data loader itself",
    "sample_packing_eff_est": "ftw measures packing efficiency itself",
    "sample_packing_mp_start_method": "packing runs in the preprocess stage",
    "total_num_tokens": "ftw counts tokens in the preprocess stage",
    "total_supervised_tokens": "ftw counts tokens in the preprocess stage",
    "tokenizer_save_jinja_files": "the tokenizer is saved with the adapter as transformers writes it",
    "gc_steps": "ftw manages memory itself",
    "gc_collect_steps": "ftw manages memory itself",
    "torch_empty_cache_steps": "ftw manages memory itself",
    "profiler_steps": "use bench/ scripts for profiling",
    "profiler_steps_start": "use bench/ scripts for profiling",
    "hub_revision": "the Hub revision comes from the job's outputs.hub.revision",
    "hf_mlflow_log_artifacts": "artifacts are published by ftw (outputs)",
    "precompute_ref_log_probs": (
        "reference log-probs are computed in the same step as the policy's, with the adapter "
        "disabled (see docs/config.md)"
    ),
}

_FTW_KERNEL = "is not loaded: ftw's own {} does this with use_kernels (on by default on CUDA) for the model families "
_FTW_KERNEL += "kernels/ covers (docs/config.md, Kernels); on others the model's own code runs, with the same result"
_NO_KERNEL = "is not loaded: ftw has no fused {}, so the model's own runs (the same result, unfused)"
# axolotl's switches for other projects' fused kernels (Liger, Cut Cross-Entropy, flash-attn's): speed, not
# results. Set on, they warn with what runs instead; set off, nothing is said.
KERNEL_SWITCHES = {
    **_group(f"Liger's RMSNorm {_FTW_KERNEL.format('fused RMSNorm')}", "liger_rms_norm"),
    **_group(f"flash-attn's RMSNorm {_FTW_KERNEL.format('fused RMSNorm')}", "flash_attn_rms_norm"),
    **_group(f"Liger's RoPE {_FTW_KERNEL.format('fused rotary embedding')}", "liger_rope"),
    **_group(f"Liger's SwiGLU {_FTW_KERNEL.format('fused SwiGLU (and LoRA MLP)')}", "liger_glu_activation"),
    **_group(f"flash-attn's fused MLP {_FTW_KERNEL.format('fused SwiGLU (and LoRA MLP)')}", "flash_attn_fuse_mlp"),
    **_group(
        f"this loss kernel {_FTW_KERNEL.format('fused linear cross-entropy (chunked, no full logits)')}",
        "liger_fused_linear_cross_entropy liger_cross_entropy cut_cross_entropy flash_attn_cross_entropy "
        "chunked_cross_entropy chunked_cross_entropy_num_chunks",
    ),
    **_group(f"Liger's LayerNorm {_NO_KERNEL.format('LayerNorm')}", "liger_layer_norm"),
    **_group(f"Liger's gated RMSNorm {_NO_KERNEL.format('gated RMSNorm')}", "liger_rms_norm_gated"),
}

# key -> why; set to a value other than None/False/0/[]/{}/"" it is an error.
UNSUPPORTED = {
    **_group("a vLLM server for RL generation (ftw generates with transformers; see trl.use_vllm)", "vllm"),
    **_group("RPO (DPO plus an NLL term)", "rpo_alpha"),
    **_group("GPTQ-quantised base models", "gptq gptq_groupsize gptq_model_v1 gptq_disable_exllama"),
    **_group("quantisation-aware training and post-training quantisation", "qat quantization"),
    **_group("llm-compressor sparsity", "llmcompressor"),
    **_group(
        "reward-model and classification heads",
        "reward_model process_reward_model num_labels center_rewards_coefficient cls_model_config",
    ),
    **_group(
        "context/tensor/expert parallelism and custom device meshes",
        "context_parallel_size tensor_parallel_size expert_parallel_size dp_shard_size dp_replicate_size "
        "sequence_parallel_degree heads_k_stride ring_attn_func",
    ),
    **_group("Ray launching", "use_ray ray_num_workers ray_run_name resources_per_worker"),
    **_group("partial freezing by name", "unfrozen_parameters"),
    **_group("LISA layer sampling", "lisa_n_layers lisa_step_interval lisa_layers_attribute"),
    **_group("ReLoRA", "relora relora_steps relora_cpu_offload relora_prune_method relora_prune_ratio"),
    **_group("diffusion language models", "diffusion"),
    **_group(
        "logging integrations other than W&B, MLflow and TensorBoard",
        "use_swanlab use_trackio use_comet use_otel_metrics",
    ),
    **_group("tiled MLP", "tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp"),
    **_group(
        "MoE expert kernels other than ScatterMoE (use_scattermoe: true is ftw's own)",
        "use_sonicmoe llama4_linearized_experts use_glm_dsa_kernels use_dsv4_kernels dsv4_fp4_grouped_mode",
    ),
    "quantize_moe_experts": (
        "quantising the 3-D expert tensors is not built: bitsandbytes quantises nn.Linear layers only, "
        "so under load_in_4bit the experts load in bf16; remove the key and plan memory for bf16 experts"
    ),
    **_group(
        "custom quantisation configs",
        "model_quantization_config model_quantization_config_kwargs nvfp4_merge_aware bnb_config_kwargs use_onebitllms",
    ),
    **_group("mistral-common tokenizers", "tokenizer_use_mistral_common"),
    **_group("multimodal models", "freeze_mm_modules image_size image_resize_algorithm role_boundaries"),
    **_group(
        "LoftQ and other custom PEFT initialisation",
        "peft loftq_config peft_init_lora_weights peft_layer_replication peft_layers_pattern "
        "peft_trainable_token_indices peft_autocast_adapter_dtype peft_ensure_weight_tying lora_rank_pattern "
        "lora_alpha_pattern lora_embedding_kernel",
    ),
    **_group(
        "LoRA+ and per-group learning rates",
        "loraplus_lr_ratio loraplus_lr_embedding lr_groups embedding_lr embedding_lr_scale",
    ),
    **_group(
        "plugin and fused kernels (ftw ships its own, see kernels/)",
        "fused_attn_kernel flash_attn_d512 scaling_softmax scaling_softmax_bias scaling_softmax_factor "
        "large_head_attention sdpa_varlen",
    ),
    **_group("custom attention implementations", "gemma4_hybrid_attn_impl flex_attn_compile_kwargs s2_attention"),
    "xformers_attention": "xFormers attention (use attn_implementation: sdpa or flash_attention_2)",
    "sage_attention": "SageAttention (use attn_implementation: sdpa or flash_attention_2)",
    **_group("DeepSpeed deepcompile", "deepcompile"),
    **_group("download filters", "base_model_ignore_patterns"),
    **_group(
        "special embedding handling",
        "mean_resizing_embeddings shrink_embeddings fix_untrained_tokens embeddings_skip_upcast reinit_weights",
    ),
    **_group(
        "alternative batching and sampling",
        "multipack_real_batches curriculum_sampling batch_flattening sample_packing_sequentially auto_find_batch_size",
    ),
    **_group(
        "optimizer-specific options of optimizers ftw does not ship",
        "adam_beta3 adam_epsilon2 optim_target_modules dion_lr dion_momentum dion_rank_fraction dion_rank_multiple_of "
        "qgalore_cos_threshold qgalore_gamma_proj qgalore_proj_bits qgalore_proj_group_size qgalore_proj_quant "
        "qgalore_proj_type qgalore_queue_size qgalore_rank qgalore_scale qgalore_update_proj_gap lr_div_factor "
        "jagged_restart_steps jagged_restart_warmup_steps jagged_restart_anneal_steps",
    ),
    **_group(
        "streaming and iterable datasets",
        "streaming streaming_multipack_buffer_size preprocess_iterable pretrain_multipack_buffer_size "
        "pretrain_multipack_attn pretraining_sample_concatenation",
    ),
    **_group(
        "dataset sharding on save",
        "dataset_shard_num dataset_shard_idx num_dataset_shards_to_save dataset_keep_in_memory "
        "shuffle_before_merging_datasets",
    ),
    **_group("PoSE context extension", "use_pose pose_split_on_token_ids pose_max_context_len pose_num_chunks"),
    **_group("rope scaling by key (set it inside overrides_of_model_config)", "rope_scaling"),
    **_group(
        "sample generation during training",
        "generate_samples num_generation_samples generation_max_new_tokens generation_temperature generation_top_k "
        "generation_top_p generation_do_sample generation_prompt_ratio",
    ),
    **_group(
        "Gradio inference UI",
        "gradio_title gradio_share gradio_server_name gradio_server_port gradio_max_new_tokens gradio_temperature",
    ),
    **_group("benchmark evaluation", "do_bench_eval bench_dataset bench_split"),
    **_group("best-model selection", "load_best_model_at_end metric_for_best_model greater_is_better"),
    **_group("layer and activation offloading variants", "layer_offloading selective_checkpointing dynamic_checkpoint"),
    **_group(
        "torchao FP8 training of every Linear; for LoRA on Ada/Hopper GPUs fp8_base_weights: true runs the frozen "
        "base in FP8",
        "fp8 fp8_enable_fsdp_float8_all_gather",
    ),
    **_group("float32-norm training", "fp32_norms fp32_norm_classes float32 use_eaft eaft_alpha eaft_k"),
    **_group("merge methods other than PEFT's merge_and_unload", "merge_method"),
    **_group("QLoRA sharded model loading", "qlora_sharded_model_loading"),
    **_group("extra model kwargs", "overrides_of_model_kwargs"),
    **_group("FSDP options outside fsdp_config", "fsdp_final_state_dict_type"),
    **_group("DDP tuning options", "ddp_bucket_cap_mb ddp_broadcast_buffers accelerator_config torch_compile_options"),
    **_group("fixed padding multiples", "pad_to_multiple_of"),
    **_group("extra chat-template variables", "chat_template_kwargs"),
    **_group("eval sequence length different from sequence_len", "eval_sequence_len"),
    **_group("NEFTune embedding noise", "neftune_noise_alpha noisy_embedding_alpha"),
    **_group("quadratic warmup", "lr_quadratic_warmup"),
    **_group("the constant-then-cosine schedule (use cosine_min_lr_ratio)", "cosine_constant_lr_ratio"),
    **_group("length-grouped batches (use sample_packing: true)", "group_by_length"),
    **_group("overriding existing tokens by id (add new tokens with tokens:)", "added_tokens_overrides"),
}

# key -> environment variable that allows it
GATED = {
    "plugins": "FTW_ALLOW_PLUGINS",
    "torchdistx_path": "FTW_ALLOW_PLUGINS",
    "trainer_cls": "FTW_ALLOW_PLUGINS",
    "trust_remote_code": "FTW_ALLOW_REMOTE_CODE",
}

# axolotl plugins whose work ftw does natively: listed alone under `plugins`, they only warn
NATIVE_PLUGINS = {
    "axolotl.integrations.liger.LigerPlugin": (
        "ftw's own kernels (kernels/) do Liger's work: fused RMSNorm, rotary embedding, SwiGLU and linear "
        "cross-entropy; its liger_* switches warn with what runs"
    ),
    "axolotl.integrations.kernels.KernelsPlugin": "ftw's own kernels (kernels/) apply, ScatterMoE with use_scattermoe",
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": (
        "ftw fuses the loss itself where kernels/ has a family entry"
    ),
}

# prefixes of keys that belong to an unsupported integration (swanlab_*, trackio_*, ...)
UNSUPPORTED_PREFIXES = {
    "swanlab_": "SwanLab logging",
    "trackio_": "Trackio logging",
    "otel_": "OpenTelemetry metrics",
    "comet_": "Comet logging",
    "expert_parallel_": "expert parallelism",
    "dpo_": "this DPO option; ftw has dpo_loss_type (sigmoid, ipo) and dpo_label_smoothing",
    "kto_": "this KTO option; ftw has kto_desirable_weight and kto_undesirable_weight",
    "grpo_": "this GRPO option; GRPO options go in the trl: block",
}

# ---- keys of one `datasets:` entry --------------------------------------------------------------
DATASET_UNSUPPORTED = {
    **_group(
        "formats at the entry level (give prompt_format, chosen_format, rejected_format inside the dict form of type)",
        "chosen_format rejected_format prompt_format completion_format",
    ),
    **_group(
        "stepwise-supervised (process reward) datasets", "step_separator max_completion_length train_on_last_step_only"
    ),
    **_group("reasoning/thinking field mapping", "field_thinking template_thinking_key split_thinking"),
    **_group(
        "per-token training detail of a message (use a per-message training flag)", "message_field_training_detail"
    ),
    **_group(
        "input transforms and legacy conversation formats",
        "input_transform conversation input_format field_human field_model",
    ),
    **_group("distillation from logprobs", "logprobs_field temperature"),
    **_group("dataset loading scripts (they run code; datasets 4 no longer runs them)", "trust_remote_code"),
}


def unsupported_reason(key: str) -> str | None:
    """Why `key` is refused, or None when it is not an unsupported key."""
    if key in UNSUPPORTED:
        return UNSUPPORTED[key]
    return next((why for prefix, why in UNSUPPORTED_PREFIXES.items() if key.startswith(prefix)), None)


def is_off(value: object) -> bool:
    """Keys set to their 'off' value are harmless even when unsupported."""
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""

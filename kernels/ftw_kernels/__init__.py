"""Triton kernels for LoRA training and the one place that patches models with them.

The model builder calls, after `get_peft_model` (a plain HF model works too):

    from ftw_kernels import apply_kernels
    applied = apply_kernels(model, config)   # config: schemas.config.TrainingConfig

It returns the names of the patches applied (also logged). Which patches a model gets is decided
by `kernels/ftw_kernels/registry.py`: one entry per model family, guarded by the transformers version the
patched forwards were verified against, switched by axolotl's keys (`use_kernels`,
`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`), and by ftw's `fp8_base_weights` (the frozen
base in float8: kernels/ftw_kernels/fp8.py). On by default on CUDA; off on CPU unless `use_kernels:
true` forces them (the tests do, with TRITON_INTERPRET=1).
"""

from ftw_kernels.registry import apply_kernels

__all__ = ["apply_kernels"]

"""The base model's shape without its weights: a local folder's config.json, a table of common Hub
models (their published config.json values), or the Hub's config.json when it can be reached.

The table makes `ftw estimate` work offline and in seconds for the models most jobs name; a
fine-tuned or quantised variant (`-Instruct`, `-it`, `unsloth/...-bnb-4bit`) has its base's shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from schemas.paths import is_local, is_remote, resolve_local_path
from worker.job.estimate import ModelShape, hub_model_shape, local_model_shape, shape_from_config

LLAMA3_VOCAB, QWEN_VOCAB, QWEN25_BIG_VOCAB = 128256, 151936, 152064


def _cfg(
    hidden: int,
    layers: int,
    heads: int,
    kv: int,
    inter: int,
    vocab: int,
    tied: bool,
    head_dim: int | None = None,
    **more: Any,
) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "head_dim": head_dim or hidden // heads,
        **more,
    }


# name (lower case, without organisation and variant suffix) → its config.json's shape keys
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": _cfg(2048, 16, 32, 8, 8192, LLAMA3_VOCAB, True),
    "llama-3.2-3b": _cfg(3072, 28, 24, 8, 8192, LLAMA3_VOCAB, True),
    "llama-3.1-8b": _cfg(4096, 32, 32, 8, 14336, LLAMA3_VOCAB, False),
    "meta-llama-3-8b": _cfg(4096, 32, 32, 8, 14336, LLAMA3_VOCAB, False),
    "llama-3.1-70b": _cfg(8192, 80, 64, 8, 28672, LLAMA3_VOCAB, False),
    "llama-3.3-70b": _cfg(8192, 80, 64, 8, 28672, LLAMA3_VOCAB, False),
    "mistral-7b": _cfg(4096, 32, 32, 8, 14336, 32768, False),  # v0.1/v0.2 have 32000 tokens: 0.1% fewer parameters
    "mistral-nemo": _cfg(5120, 40, 32, 8, 14336, 131072, False, head_dim=128),
    "qwen2.5-0.5b": _cfg(896, 24, 14, 2, 4864, QWEN_VOCAB, True),
    "qwen2.5-1.5b": _cfg(1536, 28, 12, 2, 8960, QWEN_VOCAB, True),
    "qwen2.5-3b": _cfg(2048, 36, 16, 2, 11008, QWEN_VOCAB, True),
    "qwen2.5-7b": _cfg(3584, 28, 28, 4, 18944, QWEN25_BIG_VOCAB, False),
    "qwen2.5-14b": _cfg(5120, 48, 40, 8, 13824, QWEN25_BIG_VOCAB, False),
    "qwen2.5-32b": _cfg(5120, 64, 40, 8, 27648, QWEN25_BIG_VOCAB, False),
    "qwen3-0.6b": _cfg(1024, 28, 16, 8, 3072, QWEN_VOCAB, True, head_dim=128),
    "qwen3-1.7b": _cfg(2048, 28, 16, 8, 6144, QWEN_VOCAB, True, head_dim=128),
    "qwen3-4b": _cfg(2560, 36, 32, 8, 9728, QWEN_VOCAB, True, head_dim=128),
    "qwen3-8b": _cfg(4096, 36, 32, 8, 12288, QWEN_VOCAB, False, head_dim=128),
    "qwen3-14b": _cfg(5120, 40, 40, 8, 17408, QWEN_VOCAB, False, head_dim=128),
    "qwen3-32b": _cfg(5120, 64, 64, 8, 25600, QWEN_VOCAB, False, head_dim=128),
    "qwen3-30b-a3b": _cfg(
        2048,
        48,
        32,
        4,
        6144,
        QWEN_VOCAB,
        False,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
    ),
    "gemma-2-2b": _cfg(2304, 26, 8, 4, 9216, 256000, True, head_dim=256),
    "gemma-2-9b": _cfg(3584, 42, 16, 8, 14336, 256000, True, head_dim=256),
    "phi-3-mini-4k": _cfg(3072, 32, 32, 32, 8192, 32064, False),
    "tinyllama-1.1b": _cfg(2048, 22, 32, 4, 5632, 32000, False),
}
VARIANT_SUFFIX = re.compile(r"(-(instruct|it|chat|base|hf|bnb-4bit|unsloth|fp8|awq|gptq|\d{4}|v\d+(\.\d+)*))+$")


def known_name(model_id: str) -> str:
    name = model_id.rstrip("/").split("/")[-1].lower()
    return VARIANT_SUFFIX.sub("", name)


def known_shape(model_id: str) -> ModelShape | None:
    config = KNOWN_CONFIGS.get(known_name(model_id))
    return shape_from_config(config, source=f"table:{known_name(model_id)}") if config else None


class UnknownShape(Exception):
    """The model's shape cannot be read here; the message says what would make it known."""


def resolve_shape(base_model: str, revision: str | None, env: Mapping[str, str], ask_hub: bool = True) -> ModelShape:
    """Local folder (its config.json) → the table → the Hub (config.json only), in that order."""
    if is_local(base_model):
        folder = resolve_local_path(base_model, dict(env))
        shape = local_model_shape(folder) if folder.is_dir() else None
        if shape is None or not shape.layers:
            raise UnknownShape(f"{base_model}: no config.json with the model's dimensions in {folder}")
        return shape
    shape = known_shape(base_model)
    if shape is not None:
        return shape
    if ask_hub and not is_remote(base_model):
        shape = hub_model_shape(base_model, revision, dict(env))
        if shape is not None and shape.layers:
            return shape
    raise UnknownShape(
        f"{base_model}: shape unknown (not in ftw's table of common models, and the Hub's config.json could not be "
        "read); point base_model at a local folder holding its config.json (no weights needed), or pass --shape-from "
        "FOLDER"
    )

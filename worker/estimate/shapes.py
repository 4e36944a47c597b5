"""The base model's shape without its weights: a local folder's config.json (and its weights' size),
a table of common Hub models (their published config.json values), or the Hub's metadata when it can
be reached; and what a LoRA adapter on that shape counts (`lora_param_count`).

The table makes `ftw estimate` work offline and in seconds for the models most jobs name; a
fine-tuned or quantised variant (`-Instruct`, `-it`, `unsloth/...-bnb-4bit`) has its base's shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from schemas.paths import is_local, is_remote, resolve_local_path

LINEAR_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    params: int
    bytes_on_disk: int
    hidden: int = 0
    layers: int = 0
    q_dim: int = 0
    kv_dim: int = 0
    intermediate: int = 0
    source: str = "unknown"
    vocab: int = 0
    tied: bool = False
    experts: int = 1  # MoE: experts per layer, of which experts_per_token run for each token
    experts_per_token: int = 1
    expert_intermediate: int = 0

    @property
    def attention_params(self) -> int:
        return 2 * self.hidden * (self.q_dim + self.kv_dim)

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linear layers (what LoRA wraps and 4-bit quantises)."""
        mlp = 3 * self.hidden * (self.expert_intermediate * self.experts if self.experts > 1 else self.intermediate)
        return self.layers * (self.attention_params + mlp)

    @property
    def active_linear_params(self) -> int:
        """The linear weights one token goes through (all of them, but top-k experts of an MoE)."""
        mlp = (
            3
            * self.hidden
            * (self.expert_intermediate * self.experts_per_token if self.experts > 1 else self.intermediate)
        )
        return self.layers * (self.attention_params + mlp)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


def shape_from_config(config: dict[str, Any], bytes_on_disk: int = 0, source: str = "config.json") -> ModelShape:
    """Parameter count of a decoder-only transformer from its HF config (Llama/Mistral/Qwen/MoE)."""
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 0)
    heads = int(text.get("num_attention_heads") or text.get("n_head") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or (hidden // max(heads, 1)))
    inter = int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden)
    vocab = int(text.get("vocab_size") or 0)
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    moe_inter = int(text.get("moe_intermediate_size") or inter)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attn = hidden * q_dim * 2 + hidden * kv_dim * 2
    mlp = 3 * hidden * (moe_inter * experts if experts > 1 else inter)
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings")))
    embeddings = vocab * hidden * (1 if tied else 2)
    params = layers * (attn + mlp + 2 * hidden) + embeddings
    if not bytes_on_disk:
        dtype = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "bfloat16")
        bytes_on_disk = params * (4 if "32" in dtype else 2)
    per_token = int(text.get("num_experts_per_tok") or 1) if experts > 1 else 1
    return ModelShape(
        params,
        bytes_on_disk,
        hidden,
        layers,
        q_dim,
        kv_dim,
        inter,
        source,
        vocab,
        tied,
        experts,
        per_token,
        moe_inter if experts > 1 else 0,
    )


def local_model_shape(folder: Path) -> ModelShape | None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    index = folder / "model.safetensors.index.json"
    size = 0
    if index.is_file():
        size = int((json.loads(index.read_text()).get("metadata") or {}).get("total_size") or 0)
    if not size:
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(
            p.stat().st_size for p in folder.glob("*.bin")
        )
    if config is None:
        return ModelShape(params=size // 2, bytes_on_disk=size, source="files") if size else None
    return shape_from_config(config, size, source=str(folder))


def hub_model_shape(repo_id: str, revision: str | None, env: Mapping[str, str]) -> ModelShape | None:
    """Sizes from the Hub's metadata (a few small requests); None when the Hub cannot be asked."""
    if (env.get("HF_HUB_OFFLINE") or "") in ("1", "true"):
        return None
    try:
        from huggingface_hub import HfApi, hf_hub_download

        token = env.get("HF_TOKEN") or None
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
        size = sum((s.size or 0) for s in (info.siblings or []) if s.rfilename.endswith((".safetensors", ".bin")))
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision, token=token)).read_text())
        return shape_from_config(config, size, source=f"hub:{repo_id}")
    except Exception:  # offline, gated, private without token: the estimate says it does not know
        return None


def model_shape(cfg: TrainingConfig, env: Mapping[str, str]) -> tuple[ModelShape | None, bool]:
    """(shape, needs_download)."""
    if is_local(cfg.base_model):
        folder = resolve_local_path(cfg.base_model, env)
        return (local_model_shape(folder) if folder.is_dir() else None), False
    if is_remote(cfg.base_model):
        return None, True
    return hub_model_shape(cfg.base_model, cfg.revision_of_model, env), True


def adapter_params(cfg: TrainingConfig, shape: ModelShape) -> int:
    targets = cfg.lora_target_modules
    names: tuple[str, ...]
    if cfg.lora_target_linear or targets in (None, "all-linear"):
        names = LINEAR_MODULES
    else:
        names = (
            tuple(t for t in ([targets] if isinstance(targets, str) else targets) if t in LINEAR_MODULES)
            or LINEAR_MODULES[:4]
        )
    return lora_param_count(shape, cfg.lora_r, names)


def lora_param_count(shape: ModelShape, r: int, names: tuple[str, ...]) -> int:
    """A and B of rank r on each named linear layer (an MoE's experts each get their own)."""
    h, q, kv = shape.hidden, shape.q_dim, shape.kv_dim
    i, copies = (shape.expert_intermediate, shape.experts) if shape.experts > 1 else (shape.intermediate, 1)
    io = {
        "q_proj": h + q,
        "k_proj": h + kv,
        "v_proj": h + kv,
        "o_proj": q + h,
        "gate_proj": (h + i) * copies,
        "up_proj": (h + i) * copies,
        "down_proj": (i + h) * copies,
    }
    return r * shape.layers * sum(io[n] for n in names)


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
        f"{base_model}: shape unknown (not in ftw's table of common models, "
        "and the Hub's config.json could not be read); "
        "point base_model at a local folder holding its config.json (no weights needed), or pass --shape-from FOLDER"
    )

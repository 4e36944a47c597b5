"""How much disk and GPU memory a job will need, from metadata only (no model load, no download).

The base model's size comes from a local folder's safetensors files (or their index's total_size),
else from its config.json (parameter count from the architecture), else from the Hub's file
metadata when reachable. Disk = model download (Hub models only) + datasets + their prepared
cache + checkpoints × save_total_limit + final adapter/model + merged model, plus a margin.
Each part is reported, so a failure can say exactly what does not fit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from schemas.paths import is_local, is_remote, resolve_local_path
from worker.errors import InfraError

MiB, GiB = 1 << 20, 1 << 30
MARGIN = 0.10
FIXED_OVERHEAD = 4 * MiB  # logs, config, state, events
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


@dataclass
class DiskEstimate:
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        subtotal = sum(self.parts.values())
        return int(subtotal * (1 + MARGIN)) + FIXED_OVERHEAD

    def as_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total, "parts_bytes": dict(self.parts), "notes": list(self.notes)}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


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


def hub_model_shape(repo_id: str, revision: str | None, env: dict[str, str]) -> ModelShape | None:
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


def model_shape(cfg: TrainingConfig, env: dict[str, str]) -> tuple[ModelShape | None, bool]:
    """(shape, needs_download)."""
    if is_local(cfg.base_model):
        folder = resolve_local_path(cfg.base_model, env)
        return (local_model_shape(folder) if folder.is_dir() else None), False
    if is_remote(cfg.base_model):
        return None, True
    return hub_model_shape(cfg.base_model, cfg.revision_of_model, env), True


def adapter_params(cfg: TrainingConfig, shape: ModelShape) -> int:
    targets = cfg.lora_target_modules
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


def dataset_bytes(cfg: TrainingConfig, env: dict[str, str]) -> tuple[int, list[str]]:
    total, notes = 0, []
    for ds in [*(cfg.datasets or []), *(cfg.test_datasets or []), *(cfg.pretraining_dataset or [])]:
        if is_local(ds.path):
            p = resolve_local_path(ds.path, env)
            if p.is_file():
                total += p.stat().st_size
            elif p.is_dir():
                total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            notes.append(f"dataset {ds.path}: size not known before download (not counted)")
    return total, notes


def estimate_disk(cfg: TrainingConfig, env: dict[str, str]) -> tuple[DiskEstimate, ModelShape | None]:
    est = DiskEstimate()
    shape, download = model_shape(cfg, env)
    if shape is None:
        est.notes.append(f"base model {cfg.base_model}: size unknown before download (not counted)")
    elif download:
        est.parts["base_model_download"] = shape.bytes_on_disk
    data, notes = dataset_bytes(cfg, env)
    est.notes += notes
    if data:
        est.parts["datasets"] = data
        est.parts["prepared_cache"] = 2 * data  # int32 ids + labels + positions per token ≈ 2× the text
    if shape is not None:
        if cfg.adapter:
            adapter = adapter_params(cfg, shape) * 4
            optimizer = 0 if cfg.save_only_model else 2 * adapter
            est.parts["checkpoints"] = (adapter + optimizer) * cfg.save_total_limit
            est.parts["adapter"] = adapter
            if cfg.merge_lora:
                est.parts["merged_model"] = shape.params * 2
        else:
            weights = shape.params * 2
            optimizer = 0 if cfg.save_only_model else shape.params * 8
            est.parts["checkpoints"] = (weights + optimizer) * cfg.save_total_limit
            est.parts["model"] = weights
    return est, shape


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_disk(est: DiskEstimate, volume: Path) -> dict[str, Any]:
    """Fail with the numbers when the estimate does not fit on the volume's filesystem."""
    free = free_bytes(volume)
    report = {**est.as_dict(), "free_bytes": free, "volume": str(volume)}
    if est.total > free:
        parts = ", ".join(f"{k} {human(v)}" for k, v in est.parts.items())
        raise InfraError(
            f"not enough disk on {volume}: the job needs about {human(est.total)} ({parts}, +{int(MARGIN * 100)}% margin) "
            f"but only {human(free)} is free",
            "attach a larger network volume, lower save_total_limit, use save_only_model, or skip merge_lora",
            details=report,
        )
    return report

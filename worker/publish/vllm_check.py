"""Will vLLM load this adapter? Checked from adapter_config.json before publishing (no vLLM import).

The rules are those vLLM's LoRA loader enforces (vllm/lora/peft_helper.py and the model's
supported LoRA modules): rank ≤ the server's --max-lora-rank (FTW_MAX_LORA_RANK, default 64),
no modules_to_save (vLLM refuses adapters that carry full embed_tokens / lm_head copies), no
DoRA, no LoRA bias, targets among the linear projections vLLM's models wrap. Each problem comes
back as a warning that says what to change; publishing goes on (other servers may load it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

DEFAULT_MAX_LORA_RANK = 64
# Linear layers vLLM wraps with LoRA across its decoder models (packed names included).
VLLM_LORA_MODULES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj",
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "c_attn",
        "c_proj",
        "c_fc",
        "w1",
        "w2",
        "w3",
        "wqkv",
        "wo",
        "fc1",
        "fc2",
        "out_proj",
        "in_proj",
        "Wqkv",
        "gate",
        "experts",
    }
)
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings"})


def max_lora_rank(env: Mapping[str, str]) -> int:
    try:
        return int(env.get("FTW_MAX_LORA_RANK") or DEFAULT_MAX_LORA_RANK)
    except ValueError:
        return DEFAULT_MAX_LORA_RANK


def check_adapter(adapter_dir: Path, max_rank: int = DEFAULT_MAX_LORA_RANK) -> list[str]:
    """Warnings (what vLLM would refuse, and what to change); [] when vLLM should load it."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return [f"{adapter_dir.name} has no adapter_config.json: vLLM cannot load it as a LoRA adapter"]
    cfg = json.loads(path.read_text())
    warnings: list[str] = []
    if cfg.get("peft_type", "LORA") != "LORA":
        warnings.append(f"peft_type {cfg.get('peft_type')} is not LoRA: vLLM serves LoRA adapters only")
    rank, limit = int(cfg.get("r") or 0), max_rank
    if rank > limit:
        warnings.append(
            f"LoRA rank {rank} is above the server's max_lora_rank {limit}: lower lora_r to ≤ {limit}, "
            f"or start vLLM with --max-lora-rank {rank} (and set FTW_MAX_LORA_RANK)"
        )
    rank_pattern = cfg.get("rank_pattern") or {}
    if rank_pattern and max(rank_pattern.values()) > limit:
        warnings.append(f"rank_pattern has a rank above max_lora_rank {limit}: lower it or raise --max-lora-rank")
    saved = set(cfg.get("modules_to_save") or [])
    if saved:
        warnings.append(
            f"modules_to_save {sorted(saved)}: vLLM rejects adapters with fully trained modules "
            "(embed_tokens/lm_head); remove lora_modules_to_save (and added tokens that need it), "
            "or publish the merged model (merge_lora: true) and serve that"
        )
    if cfg.get("use_dora"):
        warnings.append(
            "DoRA (peft_use_dora) adapters are not supported by vLLM: train without DoRA or serve the merged model"
        )
    if cfg.get("bias", "none") != "none":
        warnings.append(f"lora bias {cfg.get('bias')!r}: vLLM loads LoRA without bias; set lora_bias: none")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # a regex: PEFT matched it against module names; show the names in the weights
        targets = _module_names_from_weights(adapter_dir) or []
    leaves = {t.split(".")[-1] for t in targets}
    if leaves & EMBEDDING_MODULES:
        warnings.append(
            f"LoRA on {sorted(leaves & EMBEDDING_MODULES)}: vLLM does not apply LoRA to embeddings/lm_head; "
            "drop them from lora_target_modules"
        )
    warnings += _parameter_targets(cfg.get("target_parameters") or [])
    unknown = sorted(leaves - VLLM_LORA_MODULES - EMBEDDING_MODULES)
    if unknown:
        warnings.append(
            f"target modules {unknown} are not LoRA layers vLLM is known to wrap; check that your vLLM "
            "version supports them for this architecture, or target q_proj/k_proj/v_proj/o_proj/"
            "gate_proj/up_proj/down_proj"
        )
    return warnings


def _parameter_targets(parameters: list[str]) -> list[str]:
    """LoRA through PEFT's target_parameters: MoE expert tensors (and router weights)."""
    experts = sorted(p for p in parameters if p.split(".")[-1] in ("gate_up_proj", "down_proj", "up_proj"))
    others = sorted(set(parameters) - set(experts))
    warnings = []
    if experts:
        warnings.append(
            f"target parameters {experts}: LoRA on MoE experts is served by vLLM only on CUDA (its Triton "
            "fused-MoE LoRA path); vLLM on CPU cannot load it (its CPU MoE kernel has no LoRA): there, serve "
            "this adapter with the transformers engine (FTW_SERVE_ENGINE=transformers) or publish the merged model"
        )
    if others:
        warnings.append(
            f"target parameters {others}: vLLM applies no LoRA to these (router weights); serve with the "
            "transformers engine or publish the merged model, or drop them from the targets"
        )
    return warnings


def _module_names_from_weights(adapter_dir: Path) -> list[str]:
    """Leaf module names with LoRA weights, read from the safetensors header (no torch needed)."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    names = set()
    for key in header:
        parts = key.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            names.add(parts[parts.index("lora_A" if "lora_A" in parts else "lora_B") - 1])
    return sorted(names)

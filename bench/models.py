"""What the GPU benches share: random-init models of public shapes saved as local folders (bf16 safetensors,
a tiny tokenizer; no Hub), one-packed-row-a-step prepared caches in the layout ftw's preprocessing writes,
and the LoRA recipe every ftw arm trains."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.train_throughput import DEFAULT_MBS, packed_batches
from bench.train_throughput import SHAPES as PUBLIC_SHAPES

SHAPES = {
    **PUBLIC_SHAPES,
    "tiny": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}
MBS = {**DEFAULT_MBS, "tiny": 2}
# what every ftw arm of the benches trains: one LoRA recipe, bf16, no saves, an event every step
LORA_16 = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True}
TIMED_RUN = {
    "lr_scheduler": "constant",
    "save_strategy": "no",
    "bf16": "auto",
    "attn_implementation": "sdpa",
    "logging_steps": 1,
}
PROFILED_STEPS = 3


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return round(20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12, 1)


def build_model(folder: Path, shape: str, seq: int) -> None:
    """In a spawned process: the caller never initialises CUDA, so the arms it starts find the GPU
    clean (ftw's GPU probe refuses memory held by another process)."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_build_model, args=(folder, shape, seq))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"building the {shape} model failed (exit {proc.exitcode})")


def _build_model(folder: Path, shape: str, seq: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.devtools.tiny import build_tokenizer

    build_tokenizer(folder)
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=max(seq, 4096), **spec)
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def build_cache(folder: Path, steps: int, mbs: int, seq: int, vocab: int, full_length: bool = False) -> None:
    """One packed row per step: train_throughput's `mbs` rows of that step, back to back (each row one
    sample of `seq` tokens with `full_length`, the peers' protocol)."""
    from datasets import Dataset, Features, Sequence, Value

    out = []
    for batch, _ in packed_batches(steps, mbs, seq, vocab, full_length=full_length):
        out.append({k: batch[k].flatten().tolist() for k in ("input_ids", "labels", "position_ids")})
    feats = Features({k: Sequence(Value("int32")) for k in ("input_ids", "labels", "position_ids")})
    Dataset.from_list(out, features=feats).save_to_disk(str(folder / "train"))
    manifest = {
        "complete": True,
        "fingerprint": "bench",
        "rows": {"train": steps},
        "tokens": {"train": steps * mbs * seq},
        "packing": {"enabled": True, "fill": 1.0, "bins": steps},
        "sequence_len": seq,
        "micro_batch_size": mbs,
        "versions": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))

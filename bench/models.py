"""What the GPU benches share: the public shapes, the token stream every arm trains on (packed samples of
lognormal length), random-init models of those shapes saved as local folders (bf16 safetensors, a tiny
tokenizer; no Hub), one-packed-row-a-step prepared caches in the layout ftw's preprocessing writes, and
the LoRA recipe every ftw arm trains."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PUBLIC_SHAPES = {
    "llama-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
    "qwen-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
    ),
}
DEFAULT_MBS = {"llama-1b": 8, "llama-8b": 4, "qwen-7b": 4}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNFUSED_LORA = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel")  # off: PEFT's LoRA layers (ftw-peft-lora)


# ---- the token stream (identical for every arm) -------------------------------------------------
def sample_lengths(n: int, seed: int, mean: float = 600.0, sigma: float = 0.8, cap: int = 2048) -> list[int]:
    import random

    rng = random.Random(seed)
    mu = math.log(mean) - sigma**2 / 2  # lognormal with this mean
    return [max(16, min(cap, int(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def _sample(n: int, vocab: int, gen, prompt_share: float):
    """(ids, labels) of one sample of n tokens: a short random motif repeated, so the loss falls as the model learns
    to copy; its first token has no target (the previous sample's last token predicts nothing), nor has the first
    `prompt_share` of it, a prompt as a chat template's (train_on_inputs: false)."""
    import torch

    motif = torch.randint(0, min(vocab, 4096), (int(torch.randint(3, 24, (1,), generator=gen)),), generator=gen)
    ids = motif.repeat(n // len(motif) + 1)[:n]
    labels = ids.clone()
    labels[: max(1, int(n * prompt_share))] = -100
    return ids, labels


def packed_batches(
    steps: int, mbs: int, seq: int, vocab: int, seed: int = 0, full_length: bool = False, prompt_share: float = 0.0
):
    """Rows filled with whole samples back to back (the last one cut to fit), or with one sample
    of `seq` tokens each (`full_length`, the protocol of the issue's peer table); samples as `_sample` makes them.
    Yields CPU tensors and the Σs² of the batch's samples."""
    import itertools

    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = itertools.repeat(seq) if full_length else iter(sample_lengths(steps * mbs * 64, seed))
    for _ in range(steps):
        ids = torch.empty(mbs, seq, dtype=torch.long)
        pos = torch.empty(mbs, seq, dtype=torch.long)
        labels = torch.empty(mbs, seq, dtype=torch.long)
        sum_sq = 0
        for r in range(mbs):
            at = 0
            while at < seq:
                n = min(next(lengths), seq - at)
                ids[r, at : at + n], labels[r, at : at + n] = _sample(n, vocab, gen, prompt_share)
                pos[r, at : at + n] = torch.arange(n)
                sum_sq += n * n
                at += n
        yield dict(input_ids=ids, position_ids=pos, labels=labels), sum_sq


def padded_batches(steps: int, mbs: int, seq: int, vocab: int, seed: int = 0, prompt_share: float = 0.0):
    """Unpacked micro-batches (sample_packing: false): `mbs` samples of the same lognormal lengths, one a row, padded
    to the longest with an attention mask (labels -100 on the padding). Yields CPU tensors and the Σs²."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = iter(sample_lengths(steps * mbs, seed, cap=seq))
    for _ in range(steps):
        ns = [next(lengths) for _ in range(mbs)]
        width = max(ns)
        batch = dict(
            input_ids=torch.zeros(mbs, width, dtype=torch.long),
            position_ids=torch.zeros(mbs, width, dtype=torch.long),
            labels=torch.full((mbs, width), -100, dtype=torch.long),
            attention_mask=torch.zeros(mbs, width, dtype=torch.long),
        )
        for r, n in enumerate(ns):
            batch["input_ids"][r, :n], batch["labels"][r, :n] = _sample(n, vocab, gen, prompt_share)
            batch["position_ids"][r, :n] = torch.arange(n)
            batch["attention_mask"][r, :n] = 1
        yield batch, sum(n * n for n in ns)


def flattened(batch: dict) -> dict:
    """A padded micro-batch as the trainer's padding-free batches are: its samples end to end in one packed row
    (worker/train/batches.py `collate(flatten=True)`)."""
    from worker.train.batches import collate

    rows = [
        {k: batch[k][r][batch["attention_mask"][r].bool()] for k in ("input_ids", "labels", "position_ids")}
        for r in range(batch["input_ids"].shape[0])
    ]
    return collate(rows, 0, packed=False, flatten=True)


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
# Qwen3-30B-A3B's layer, 12 of its 48 layers (bench/moe.py's MoE shape, for the real path)
SHAPES["qwen3-moe-12l"] = dict(
    model_type="qwen3_moe",
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=12,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    decoder_sparse_step=1,
    norm_topk_prob=True,
    vocab_size=151936,
    tie_word_embeddings=False,
)
MBS = {**DEFAULT_MBS, "tiny": 2, "qwen3-moe-12l": 2}
# what every ftw arm of the benches trains: one LoRA recipe, bf16, no saves, an event every step
LORA_16 = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True}
# a MoE shape's: LoRA on the attention projections and on the routed experts (bench/moe.py's recipe)
LORA_16_MOE = {
    "adapter": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}
TIMED_RUN = {
    "lr_scheduler": "constant",
    "save_strategy": "no",
    "bf16": "auto",
    "attn_implementation": "sdpa",
    "logging_steps": 1,
}
PROFILED_STEPS = 3


def train_steps(run_dir: Path, key: str) -> dict[int, dict]:
    """The train stage's per-step events that carry `key` (`loss`, `reward`), by step, from an `ftw train` run's
    stage logs (the job path's supervisor gives each stage child its own events file)."""
    events = [json.loads(line) for path in sorted(run_dir.glob("logs/train/*/events.jsonl")) for line in path.open()]
    return {e["step"]: e for e in events if e.get("stage") == "train" and key in e and "event" not in e}


def seconds_per_step(steps: dict[int, dict], first: int, last: int) -> float:
    """Mean seconds a step over steps first+1 … last of an `ftw train` run's step events (`train_steps`): their
    `step_ms`, timed on the GPU's clock (worker/train/step_queue.py), where every step of the window has an event
    with it; else (a CPU run, or `logging_steps` > 1 leaving steps without events) the timestamps of `first`'s and
    `last`'s events, which the trainer writes when it reads a step back: a step or two late, several at once, and
    the last one on time, so the window's first timestamp can be late by up to a step."""
    window = [steps.get(s, {}) for s in range(first + 1, last + 1)]
    if all("step_ms" in e for e in window):
        return sum(e["step_ms"] for e in window) / 1e3 / len(window)
    return seconds_per_step_by_timestamps(steps, first, last)


def seconds_per_step_by_timestamps(steps: dict[int, dict], first: int, last: int) -> float:
    """The same window timed by the timestamps of `first`'s and `last`'s events alone (see `seconds_per_step`)."""
    return (steps[last]["ts"] - steps[first]["ts"]) / (last - first)


def ftw_train(config: Path, run_dir: Path, volume: Path, allowed: list[Path], timeout: float):
    """`ftw train CONFIG --run-dir RUN_DIR` as a user runs it (the job path's supervisor and its stage
    children), over `volume`, the model and data folders in `allowed`. RUN_DIR is scratch, emptied first: a
    finished run there would be reported as done, not trained and timed again."""
    shutil.rmtree(run_dir, ignore_errors=True)
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "train", str(config), "--run-dir", str(run_dir)],
        env={
            **os.environ,
            "BASE_VOLUME": str(volume),
            "FTW_ALLOW_CPU": "1",
            "FTW_ALLOWED_PATHS": os.pathsep.join(map(str, allowed)),
            "PYTHONPATH": path,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak_tflops() -> float | None:
    """The bf16 matmul rate this GPU reaches now (8192³, timed by CUDA events), the base of the benches' MFU;
    None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12, 1)


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


def build_cache(
    folder: Path,
    steps: int,
    mbs: int,
    seq: int,
    vocab: int,
    full_length: bool = False,
    prompt_share: float = 0.0,
    unpacked: bool = False,
) -> None:
    """One packed row per step: train_throughput's `mbs` rows of that step, back to back (each row one
    sample of `seq` tokens with `full_length`, the peers' protocol; `prompt_share`: see packed_batches); `unpacked`:
    `padded_batches`' samples one a row, unpadded, and the manifest says unpacked (sample_packing: false)."""
    from datasets import Dataset, Features, Sequence, Value

    keys = ("input_ids", "labels", "position_ids")
    out = []
    if unpacked:
        for batch, _ in padded_batches(steps, mbs, seq, vocab, prompt_share=prompt_share):
            real = batch["attention_mask"].bool()
            out += [{k: batch[k][r][real[r]].tolist() for k in keys} for r in range(mbs)]
    else:
        for batch, _ in packed_batches(steps, mbs, seq, vocab, full_length=full_length, prompt_share=prompt_share):
            out.append({k: batch[k].flatten().tolist() for k in keys})
    feats = Features({k: Sequence(Value("int32")) for k in keys})
    Dataset.from_list(out, features=feats).save_to_disk(str(folder / "train"))
    manifest = {
        "complete": True,
        "fingerprint": "bench",
        "rows": {"train": len(out)},
        "tokens": {"train": sum(len(r["input_ids"]) for r in out)},
        "packing": {"enabled": not unpacked, "fill": None if unpacked else 1.0, "bins": None if unpacked else steps},
        "sequence_len": seq,
        "micro_batch_size": mbs,
        "versions": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))

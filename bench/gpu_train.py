"""`ftw train`'s real code path on one GPU against plain transformers+peft, in the same call.

    python bench/gpu_train.py --out OUT_DIR                     # Llama-3.2-1B shape, all arms
    python bench/gpu_train.py --out OUT_DIR --shape tiny --steps 3 --warmup 1 --arms hf,ftw   # CPU dry run

A random-init model of the Llama-3.2-1B shape is saved to a local folder (bf16 safetensors) and a
prepared-data cache is written to docs/contracts.md: packed rows of micro_batch_size × sequence_len
= 4 × 2048 tokens, each filled with whole samples of lognormal length (≤ 2048, position_ids
restarting per sample). Every arm trains LoRA r=16 α=32 on all seven linear layers, bf16, sdpa,
on those same rows, one process each:
  hf     plain transformers+peft loop (fused AdamW), the same packed rows (transformers splits
         attention at the position_id resets), timed with CUDA syncs after --warmup steps;
  ftw    `python -m worker.train` — the child `ftw train` runs — timed from its own step events
         (steps after --warmup), peak memory from its summary.json; merge_lora on, timed;
  ftw-nokernels  the same with use_kernels: false (the loop's own overhead against hf);
  qlora  ftw with adapter: qlora, load_in_4bit (bitsandbytes), when importable.
Prints a table and writes OUT_DIR/gpu_train.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, rope_theta=500000.0),
}
ARM_TIMEOUT_S = 150
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.tiny import build_tokenizer

    build_tokenizer(folder)
    torch.manual_seed(0)
    with torch.device(device()):
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=max(seq, 4096), **SHAPES[shape])).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def build_cache(folder: Path, rows: int, row_len: int, max_sample: int, vocab: int, seed: int = 0) -> None:
    """Rows of exactly `row_len` tokens: whole samples back to back, the last one cut to fit."""
    from datasets import Dataset, Features, Sequence, Value

    rng = random.Random(seed)
    mu = math.log(600) - 0.32
    out = []
    for _ in range(rows):
        ids, pos = [], []
        while len(ids) < row_len:
            n = min(max(16, min(max_sample, int(rng.lognormvariate(mu, 0.8)))), row_len - len(ids))
            ids += [rng.randrange(vocab) for _ in range(n)]
            pos += list(range(n))
        out.append({"input_ids": ids, "labels": ids, "position_ids": pos})
    feats = Features({k: Sequence(Value("int32")) for k in ("input_ids", "labels", "position_ids")})
    Dataset.from_list(out, features=feats).save_to_disk(str(folder / "train"))
    manifest = {"complete": True, "fingerprint": "bench", "rows": {"train": rows}, "tokens": {"train": rows * row_len},
                "packing": {"enabled": True, "fill": 1.0, "bins": rows}, "sequence_len": max_sample, "micro_batch_size": row_len // max_sample, "versions": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ---- arms -----------------------------------------------------------------------------------------
def hf_arm(model_dir: Path, cache: Path, warmup: int, steps: int) -> dict:
    """The plain loop, in its own process (see main)."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", use_cache=False).to(dev)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=dev.type == "cuda")
    rows = load_from_disk(str(cache / "train"))
    tokens, t0 = 0, None
    for i in range(warmup + steps):
        row = rows[i % len(rows)]
        batch = {k: torch.tensor([row[k]], device=dev) for k in ("input_ids", "labels", "position_ids")}
        batch["labels"][batch["position_ids"] == 0] = -100
        if i == warmup:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += batch["input_ids"].numel()
    torch.cuda.synchronize() if dev.type == "cuda" else None
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"tokens_per_s": round(tokens / dt), "peak_memory_gib": None if peak is None else round(peak, 2), "final_loss": round(float(loss), 4)}


def ftw_arm(name: str, model_dir: Path, cache: Path, work: Path, warmup: int, steps: int, seq: int, mbs: int) -> dict:
    from schemas.config import TrainingConfig

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a warm machine keeps the last call's events
    run_dir.mkdir(parents=True)
    cfg = {
        "base_model": str(model_dir), "datasets": [{"path": "bench.jsonl", "type": "completion"}],
        "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True, "merge_lora": name == "ftw",
        "sequence_len": seq, "sample_packing": True, "micro_batch_size": mbs, "max_steps": warmup + steps,
        "learning_rate": 1e-4, "optimizer": "adamw_torch_fused", "lr_scheduler": "constant", "save_strategy": "no",
        "bf16": "auto", "attn_implementation": "sdpa", "logging_steps": 1,
    }
    if name == "ftw-nokernels":
        cfg["use_kernels"] = False
    if name == "qlora":
        cfg.update(adapter="qlora", load_in_4bit=True)
    (run_dir / "config.json").write_text(TrainingConfig.model_validate(cfg).model_dump_json())
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "FTW_EVENTS": str(run_dir / "events.jsonl"), "FTW_ERROR_FILE": str(run_dir / "error.json"), "PYTHONPATH": path}
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "worker.train", str(run_dir / "config.json"), "--run-dir", str(run_dir), "--data", str(cache)],
                              env=env, capture_output=True, text=True, timeout=ARM_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {ARM_TIMEOUT_S} s: {(e.stderr or b'')[-800:]!r}", "exit": None}
    wall = time.monotonic() - started
    if proc.returncode != 0:
        return {"error": (proc.stderr or "")[-1500:], "exit": proc.returncode}
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # per-step events only: the closing "done" event also carries the loss, after the outputs are written
    ts = {e["step"]: e["ts"] for e in events if e.get("stage") == "train" and "loss" in e and "event" not in e}
    summary = json.loads((run_dir / "summary.json").read_text())
    last = max(ts)
    per_step = summary["tokens"] / summary["steps"]
    result = {
        "tokens_per_s": round(per_step * (last - warmup) / (ts[last] - ts[warmup])),
        "peak_memory_gib": summary["peak_memory_gib"], "final_loss": summary["final_loss"],
        "kernels": summary["kernels"], "child_wall_s": round(wall, 1),
    }
    merge = [e["ts"] for e in events if e.get("stage") == "merge"]
    done = [e["ts"] for e in events if e.get("event") == "done"]
    if merge and done:
        result["merge_s"] = round(done[-1] - merge[0], 1)
        result["merged_gib"] = round(sum(p.stat().st_size for p in (run_dir / "merged").glob("*.safetensors")) / 2**30, 2)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftw-gpu-bench"))
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--arms", default="hf,ftw,qlora,ftw-nokernels")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run the hf arm in this process
    a = ap.parse_args()
    model_dir, cache = a.work / "model", a.work / "cache"
    if a.arm == "hf":
        print("RESULT " + json.dumps(hf_arm(model_dir, cache, a.warmup, a.steps)), flush=True)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"shape": a.shape, "seq": a.seq, "mbs": a.mbs, "tokens_per_step": a.seq * a.mbs, "warmup": a.warmup, "steps": a.steps,
                     "matmul_peak_tflops": matmul_peak_tflops(), "arms": {}}
    t = time.monotonic()
    build_model(model_dir, a.shape, a.seq)
    build_cache(cache, a.warmup + a.steps, a.seq * a.mbs, a.seq, SHAPES[a.shape]["vocab_size"])
    results["setup_s"] = round(time.monotonic() - t, 1)
    for arm in a.arms.split(","):
        print(f"--- {arm}", flush=True)
        if arm == "hf":
            try:
                proc = subprocess.run([sys.executable, __file__, "--arm", "hf", "--out", str(a.out), "--work", str(a.work), "--warmup", str(a.warmup), "--steps", str(a.steps)],
                                      capture_output=True, text=True, timeout=ARM_TIMEOUT_S)
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                results["arms"][arm] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-1500:]}
            except subprocess.TimeoutExpired:
                results["arms"][arm] = {"error": f"timed out after {ARM_TIMEOUT_S} s"}
        elif arm == "qlora" and not _has_cuda_bnb():
            results["arms"][arm] = {"error": "bitsandbytes with CUDA not available"}
        else:
            results["arms"][arm] = ftw_arm(arm, model_dir, cache, a.work, a.warmup, a.steps, a.seq, a.mbs)
        print(json.dumps(results["arms"][arm])[:2000], flush=True)
        (a.out / "gpu_train.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def _has_cuda_bnb() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def table(r: dict) -> str:
    base = r["arms"].get("hf", {}).get("tokens_per_s")
    lines = ["| arm | tokens/s | vs hf | peak GiB | final loss | notes |", "|---|---:|---:|---:|---:|---|"]
    for arm, v in r["arms"].items():
        if "error" in v:
            lines.append(f"| {arm} | — | — | — | — | failed: {v['error'].strip().splitlines()[-1][:120] if v['error'].strip() else v.get('exit')} |")
            continue
        ratio = f"{v['tokens_per_s'] / base:.2f}×" if base else "—"
        notes = ", ".join(filter(None, [f"kernels: {'+'.join(v['kernels']) or 'none'}" if "kernels" in v else "",
                                        f"merge {v['merge_s']} s → {v['merged_gib']} GiB" if "merge_s" in v else ""]))
        lines.append(f"| {arm} | {v['tokens_per_s']:,} | {ratio} | {v['peak_memory_gib']} | {v['final_loss']} | {notes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

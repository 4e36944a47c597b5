"""Strided EBFT on one GPU: document tokens per second and peak memory, flex-attention block mask vs dense mask.

    python bench/ebft.py                      # Llama-3.2-1B shape (random weights, no download), GPU
    python bench/ebft.py --tiny               # tiny shape on the CPU (a dry run of the same code)

The model is built from the shape's config (bench/gpu_train.py's SHAPES) with random weights, bf16
on a GPU (fp32 on the CPU), LoRA r=16 α=32 on all linear layers, sdpa for ordinary forwards. Each
step is one micro-batch of `--docs` random documents of each `--doc-lens` length through ftw's
strided objective (worker/train/ebft_strided.py: generation, features with the adapter disabled,
rewards, the policy loss with grad) and an AdamW step; ebft settings are axolotl's example's (stride
8, context 8, 8 generated tokens, 4 rollouts, whitening). Both attention paths run the same steps:
  flex   torch's flex_attention with the strided BlockMask (the GPU default)
  dense  a (1, 1, L, L) boolean mask through sdpa (the CPU default)
Timed after --warmup steps; document tokens/s = docs × doc_len × steps / seconds; peak memory is
torch.cuda.max_memory_allocated per arm (0 on the CPU). An arm that runs out of memory is reported
as OOM. Prints a table, ratios against dense at the same length, and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
from bench.gpu_train import SHAPES  # noqa: E402


def build(shape: str, device: Any, max_len: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec: dict[str, Any] = dict(SHAPES[shape])
    config = AutoConfig.for_model(str(spec.pop("model_type")), max_position_embeddings=max(max_len, 4096), **spec)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    return model


def arm(model: Any, path: str, doc_len: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from schemas.config import TrainingConfig
    from worker.train.ebft_strided import StridedEbftObjective

    device = next(model.parameters()).device
    cfg = TrainingConfig.model_validate(
        {
            "base_model": "bench",
            "learning_rate": 1e-5,
            "rl": "ebft",
            "adapter": "lora",
            "sequence_len": doc_len,
            "datasets": [{"path": "bench.jsonl", "type": "ebft_pretrain.transform"}],
            "ebft": {"mode": "strided", "use_whitening": True, "ce_coef": 0.03},
        }
    )
    objective = StridedEbftObjective(cfg, model, None)
    objective.path = path
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.config.vocab_size
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        ids = torch.randint(4, vocab, (args.docs, doc_len), device=device)
        labels = ids.clone()
        labels[:, 0] = -100
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        with autocast:
            loss, _ = objective.loss(model, batch, torch.tensor(float(args.docs), device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        for _ in range(args.warmup):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"path": path, "doc_len": doc_len, "error": "OOM"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {
        "path": path,
        "doc_len": doc_len,
        "doc_tokens_per_s": round(args.docs * doc_len * args.steps / seconds, 1),
        "s_per_step": round(seconds / args.steps, 3),
        "peak_gib": round(peak, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (dry run)")
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--doc-lens", default="1024,2048,4096")
    parser.add_argument("--docs", type=int, default=1, help="documents per micro-batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paths", default="flex,dense")
    parser.add_argument("--out", type=Path, default=Path("ebft-bench.json"))
    args = parser.parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.shape, args.doc_lens, args.steps, args.warmup = "tiny", "48,96", 2, 1
    lengths = [int(x) for x in args.doc_lens.split(",")]
    model = build(args.shape, device, max(lengths) * 2)
    rows = [
        arm(model, path, n, args)
        if path == "dense" or device.type == "cuda"
        else {"path": path, "doc_len": n, "error": "n/a on CPU"}  # torch's flex_attention has no CPU backward
        for n in lengths
        for path in args.paths.split(",")
    ]
    dense = {r["doc_len"]: r for r in rows if r["path"] == "dense" and "error" not in r}
    print(f"strided EBFT, {args.shape}, {device}, {args.docs} doc(s)/step, {args.steps} steps after {args.warmup}")
    head = ("path", "doc_len", "doc tok/s", "s/step", "peak GiB", "× dense tok/s", "× dense mem")
    print(f"{head[0]:6} {head[1]:>8} {head[2]:>10} {head[3]:>8} {head[4]:>9} {head[5]:>14} {head[6]:>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:6} {r['doc_len']:>8} {r['error']:>10}")
            continue
        base = dense.get(r["doc_len"])
        speed = f"{r['doc_tokens_per_s'] / base['doc_tokens_per_s']:.2f}" if base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base and base["peak_gib"] else "-"
        print(
            f"{r['path']:6} {r['doc_len']:>8} {r['doc_tokens_per_s']:>10} {r['s_per_step']:>8} "
            f"{r['peak_gib']:>9} {speed:>14} {mem:>12}"
        )
    args.out.write_text(json.dumps({"shape": args.shape, "device": str(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

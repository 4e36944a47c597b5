"""Strided EBFT on one GPU: document tokens per second and peak memory, flex-attention block mask vs dense mask,
and axolotl's strided EBFT trainer as a peer.

    python bench/ebft.py                      # Llama-3.2-1B shape (random weights, no download), GPU
    python bench/ebft.py --tiny               # tiny shape on the CPU (a dry run of the same code)
    python bench/ebft.py --arms flex,dense,axolotl --axolotl-site DIR   # with the peer (bench/ebft_axolotl.py)

The model is built from the shape's config (bench/models.py's SHAPES) with random weights, bf16
on a GPU (fp32 on the CPU), LoRA r=16 α=32 on all linear layers, sdpa for ordinary forwards. Each
step is one micro-batch of `--docs` random documents of each `--doc-lens` length (the same documents
for every arm: step i's are drawn from seed i) and an AdamW step; ebft settings are axolotl's
example's (stride 8, context 8, 8 generated tokens, 4 rollouts, whitening; EBFT below). The arms:
  flex     ftw's strided objective (worker/train/ebft_strided.py: generation, features with the adapter
           disabled, rewards, the policy loss with grad) with torch's flex_attention and the strided
           BlockMask (the GPU default)
  dense    the same with a (1, 1, L, L) boolean mask through sdpa (the CPU default)
  axolotl  axolotl 0.18.0's AxolotlStridedEBFTTrainer.compute_loss (from its wheel, installed in
           --axolotl-site), same settings, shape and documents, in a fresh process after the ftw arms
           have freed the GPU: bench/ebft_axolotl.py
Timed after --warmup steps; document tokens/s = docs × doc_len × steps / seconds; peak memory is
torch.cuda.max_memory_allocated per arm (0 on the CPU). An arm that runs out of memory is reported
as OOM. Prints a table, ratios against --baseline at the same length, and writes --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
from bench.models import SHAPES  # noqa: E402

EBFT = {"mode": "strided", "use_whitening": True, "ce_coef": 0.03}  # the rest at axolotl's defaults (ftw's too)
LEARNING_RATE = 1e-5


def build(shape: str, device: Any, max_len: int, dtype: Any = None) -> Any:
    """The LoRA model of `shape`: bf16 on a GPU, fp32 on the CPU unless `dtype` says otherwise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec: dict[str, Any] = dict(SHAPES[shape])
    config = AutoConfig.for_model(str(spec.pop("model_type")), max_position_embeddings=max(max_len, 4096), **spec)
    torch.manual_seed(0)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    return model


def documents(vocab: int, docs: int, doc_len: int, step: int, device: Any) -> dict[str, Any]:
    """Step `step`'s micro-batch: random tokens from seed `step` (the same in every arm and process)."""
    import torch

    ids = torch.randint(4, vocab, (docs, doc_len), generator=torch.Generator().manual_seed(step)).to(device)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def measure(name: str, doc_len: int, step: Callable[[int], None], device: Any, args: argparse.Namespace) -> dict:
    """Time `step(i)` over args.steps steps after args.warmup; one table row (or OOM)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        for i in range(args.warmup):
            step(i)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
        sync()
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"path": name, "doc_len": doc_len, "error": "OOM"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {
        "path": name,
        "doc_len": doc_len,
        "doc_tokens_per_s": round(args.docs * doc_len * args.steps / seconds, 1),
        "s_per_step": round(seconds / args.steps, 3),
        "peak_gib": round(peak, 2),
    }


def arm(model: Any, path: str, doc_len: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from schemas.config import TrainingConfig
    from worker.train.ebft_strided import StridedEbftObjective

    device = next(model.parameters()).device
    cfg = TrainingConfig.model_validate(
        {
            "base_model": "bench",
            "learning_rate": LEARNING_RATE,
            "rl": "ebft",
            "adapter": "lora",
            "sequence_len": doc_len,
            "datasets": [{"path": "bench.jsonl", "type": "ebft_pretrain.transform"}],
            "ebft": EBFT,
        }
    )
    objective = StridedEbftObjective(cfg, model, None)
    objective.path = path
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step(i: int) -> None:
        batch = documents(model.config.vocab_size, args.docs, doc_len, i, device)
        with autocast:
            loss, _ = objective.loss(model, batch, torch.tensor(float(args.docs), device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(path, doc_len, step, device, args)


def axolotl_rows(args: argparse.Namespace, lengths: list[int]) -> list[dict[str, Any]]:
    """bench/ebft_axolotl.py in a fresh process, --axolotl-site first on its path: the rows it printed (one JSON
    line per length, as each finishes), and for each length it did not finish an error row with the reason."""
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    site = [str(args.axolotl_site.resolve())] if args.axolotl_site else []
    env["PYTHONPATH"] = os.pathsep.join([*site, *filter(None, [env.get("PYTHONPATH", "")])])
    cmd = [sys.executable, str(REPO / "bench" / "ebft_axolotl.py"), "--shape", args.shape]
    cmd += ["--doc-lens", ",".join(map(str, lengths)), "--docs", str(args.docs), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)] + (["--cpu"] if args.tiny else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in printed if isinstance(r, dict) and r.get("path") == "axolotl"]
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    if done.returncode < 0:  # a crash in a kernel leaves no Python error
        reason = f"the process died of {signal.Signals(-done.returncode).name}"
    finished = {r["doc_len"] for r in rows}
    missing = [n for n in lengths if n not in finished]
    return rows + [{"path": "axolotl", "doc_len": n, "error": f"failed: {reason}"} for n in missing]


def table(rows: list[dict[str, Any]], baseline: str) -> None:
    base_rows = {r["doc_len"]: r for r in rows if r["path"] == baseline and "error" not in r}
    head = ("arm", "doc_len", "doc tok/s", "s/step", "peak GiB", f"× {baseline} tok/s", f"× {baseline} mem")
    print(f"{head[0]:8} {head[1]:>8} {head[2]:>10} {head[3]:>8} {head[4]:>9} {head[5]:>14} {head[6]:>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:8} {r['doc_len']:>8} {r['error']}")
            continue
        base = base_rows.get(r["doc_len"])
        speed = f"{r['doc_tokens_per_s'] / base['doc_tokens_per_s']:.2f}" if base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base and base["peak_gib"] else "-"
        print(
            f"{r['path']:8} {r['doc_len']:>8} {r['doc_tokens_per_s']:>10} {r['s_per_step']:>8} "
            f"{r['peak_gib']:>9} {speed:>14} {mem:>12}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (dry run)")
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--doc-lens", default="1024,2048,4096")
    parser.add_argument("--docs", type=int, default=1, help="documents per micro-batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--arms", default="flex,dense", help="of flex, dense, axolotl")
    parser.add_argument("--baseline", default="dense", help="the arm the ratios are against")
    parser.add_argument(
        "--axolotl-site", type=Path, help="the axolotl arm's packages (axolotl 0.18.0, addict, trl 1.8.0, pillow)"
    )
    parser.add_argument("--out", type=Path, help="also write the rows there (JSON)")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    if unknown := set(arms) - {"flex", "dense", "axolotl"}:
        parser.error(f"unknown arms {sorted(unknown)}: use flex, dense, axolotl")
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.shape, args.doc_lens, args.steps, args.warmup = "tiny", "48,96", 2, 1
    lengths = [int(x) for x in args.doc_lens.split(",")]
    rows: list[dict[str, Any]] = []
    if ftw_arms := [a for a in arms if a != "axolotl"]:
        model = build(args.shape, device, max(lengths) * 2)
        rows = [
            arm(model, path, n, args)
            if path == "dense" or device.type == "cuda"
            else {"path": path, "doc_len": n, "error": "n/a on CPU"}  # torch's flex_attention has no CPU backward
            for n in lengths
            for path in ftw_arms
        ]
        del model  # the GPU free for the axolotl arm's process
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "axolotl" in arms:
        rows += axolotl_rows(args, lengths)
    rows.sort(key=lambda r: (r["doc_len"], arms.index(r["path"])))
    print(f"strided EBFT, {args.shape}, {device}, {args.docs} doc(s)/step, {args.steps} steps after {args.warmup}")
    table(rows, args.baseline)
    if args.out is not None:
        args.out.write_text(json.dumps({"shape": args.shape, "device": str(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

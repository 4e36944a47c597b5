"""The DPO step's log-probabilities: the tokens × vocab logits against the fused per-token losses.

    python bench/dpo_logps.py --out OUT_DIR --shape llama-1b --mbs 4          # GPU: ms/step, peak GiB, ratios
    TRITON_INTERPRET=1 python bench/dpo_logps.py --shape tiny --mbs 2 --prompt 16 --answer 48 --steps 2   # CPU

One process, one random-init model of a public shape (bench/models.py's build_model) with LoRA
r=16 α=32 on all seven linear layers and ftw's kernels applied (`use_kernels: true`), one packed row
of `--mbs` pairs (`--prompt` + 2 × `--answer` tokens each, LoRA B random so policy ≠ reference). A
step is worker/train/preference.py's DPO loss (reference forward under no_grad, then the policy's)
and its backward, two arms that differ only in how the log-probs are read: `logits` (the model's
logits, upcast in chunks) and `fused` (kernels/ftw_kernels/cross_entropy.py's per-token losses, no
logits). Timed over `--steps` after one warm-up step; peak = torch.cuda.max_memory_allocated during
those steps less what was allocated before them. Prints a table with ratios to `logits` and both
arms' losses (they must agree); writes OUT_DIR/dpo_logps.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
from bench.models import (  # noqa: E402
    SHAPES,
    TARGETS,  # noqa: E402
    build_model,
    device,
)


def measure(model, batch, fused: bool, steps: int) -> dict:
    import torch

    from schemas.config import TrainingConfig
    from worker.train.preference import PreferenceObjective

    dev = device()
    cfg = TrainingConfig(base_model="m", learning_rate=1e-4, adapter="lora", rl="dpo", use_kernels=True)
    objective = PreferenceObjective(cfg, model, fused_token_losses=fused)
    pairs = torch.tensor(float(objective.count(batch)), device=dev)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            loss = objective.loss(model, batch, pairs)[0]
        loss.backward()
        return loss.item()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]  # .item() syncs every step
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if dev.type == "cuda" else None
    return {
        "ms_per_step": round(seconds * 1e3, 1),
        "peak_gib": None if peak is None else round(peak, 3),
        "loss": losses[-1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--mbs", type=int, default=4, help="pairs in the packed row")
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--answer", type=int, default=600)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="model folder's parent (default /tmp/ftw-bench-dpo-SHAPE)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(f"/tmp/ftw-bench-dpo-{a.shape}")
    model_dir, n = work / f"model-{a.shape}", a.prompt + a.answer
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, a.shape, a.prompt + 2 * a.answer + 16)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftw_kernels import apply_kernels
    from schemas.config import TrainingConfig
    from worker.train.batches import collate

    dev = device()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, attn_implementation="sdpa"
    )
    model = get_peft_model(base.to(dev), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    kernels = apply_kernels(model, TrainingConfig(base_model="m", learning_rate=1e-4, adapter="lora", use_kernels=True))
    model.train()
    ids = torch.randint(5, 500, (2 * a.mbs * n,)).tolist()
    labels = [t if k % n >= a.prompt else -100 for k, t in enumerate(ids)]
    row = collate([{"input_ids": ids, "labels": labels, "position_ids": list(range(n)) * (2 * a.mbs)}], 0, True)
    batch = {k: v.to(dev) for k, v in row.items()}
    results = {name: measure(model, batch, fused, a.steps) for name, fused in (("logits", False), ("fused", True))}
    base_ms, base_gib = results["logits"]["ms_per_step"], results["logits"]["peak_gib"]
    shape = f"{a.mbs} pairs of {a.prompt}+{a.answer}+{a.answer} tokens"
    print(f"DPO step, {a.shape}, {shape}, kernels: {', '.join(kernels)}")
    print("| log-probs from | ms/step | × logits time | peak GiB (step) | × logits memory | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        memory = f"{r['peak_gib'] / base_gib:.2f}" if base_gib else ""
        print(
            f"| {name} | {r['ms_per_step']} | {r['ms_per_step'] / base_ms:.2f} | {r['peak_gib']} | {memory} "
            f"| {r['loss']:.6f} |"
        )
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "dpo_logps.json").write_text(
            json.dumps({"shape": a.shape, "mbs": a.mbs, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

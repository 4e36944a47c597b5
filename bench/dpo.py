"""DPO with LoRA on one GPU: ftw's train child against TRL's DPOTrainer + PEFT, on the same pairs.

    python bench/dpo.py --out OUT_DIR                                   # Llama-3.2-1B shape, arms ftw,trl
    python bench/dpo.py --out OUT_DIR --shape llama-8b --mbs 2
    # CPU: both arms' losses side by side (the same pairs every step, a learning rate that moves them)
    python bench/dpo.py --shape tiny --mbs 4 --pairs 4 --steps 8 --warmup 1 --prompt 16 --answer 48 --lr 1e-3
    python bench/dpo.py --ref-share --shape tiny                        # reference forward's share of a step (CPU)
    TRITON_INTERPRET=1 python bench/dpo.py --shape tiny ... --use-kernels  # CPU: the ftw arm through ftw's kernels

A random-init model of a public shape (bench/models.py's build_model: bf16 safetensors, the tiny
ByteLevel tokenizer) and a JSONL of preference pairs: a `--prompt`-token prompt and `--answer`-token
chosen and rejected answers of random words (defaults 100 + 600 + 600: pairs of ~600+600 tokens).
Both arms read that file as raw text (ftw: the dict form of `type`; TRL: its non-conversational
prompt/chosen/rejected), train LoRA r=16 α=32 on all seven linear layers, bf16, sdpa, `--mbs` pairs a
step, no gradient checkpointing, reference = adapter disabled (TRL does the same for a PEFT model), with
the same optimisation set explicitly on both sides (MATCHED: TRL 1.16's DPOConfig defaults — sigmoid
loss, beta 0.1, no label smoothing, AdamW β 0.9/0.999 ε 1e-8, no weight decay, grad norm 1.0 — with
`--lr` (5e-6) constant and no warmup), each arm in a fresh process:
  ftw  `python -m worker.cli train` (preprocess, then the train child: chosen and rejected of
       `--mbs` pairs packed in one row); timed from its per-step events after --warmup; peak memory
       from its summary.json (torch.cuda.max_memory_allocated).
  trl  DPOTrainer(DPOConfig(...), peft_config=LoraConfig(...)); timed by a callback's per-step
       timestamps after --warmup; peak torch.cuda.max_memory_allocated.
Prints a table (pairs/s, ms/step, peak GiB, ratios to trl, the loss of the first and last step) and
writes OUT_DIR/dpo.json (each arm's loss at every step). The LoRA B matrices start at zero in both arms,
so the first step's loss is ln 2 in both; with `--pairs` = `--mbs` every step sees the same pairs in
both arms (their data orders differ), so the loss curves are comparable step by step.
TRL is not in ftw's requirements: pass its wheel folder with --trl-path (PYTHONPATH of the trl arm)
or install it (pinned: trl==1.16.0, needs pandas).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
from bench.models import (  # noqa: E402
    LORA_16,
    SHAPES,
    TARGETS,  # noqa: E402
    TIMED_RUN,
    build_model,
    device,
    ftw_train,
    seconds_per_step,
    train_steps,
)

WORDS = (
    "the quick brown fox jumps over lazy dog answer question hello world reverse copy upper lower sort count".split()
)
# Both arms' optimisation, set explicitly on each side: TRL 1.16 DPOConfig's defaults (its TrainingArguments')
MATCHED = {
    "beta": 0.1,
    "label_smoothing": 0.0,
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "seed": 0,
}


def text_of(tok, n_tokens: int, rng: random.Random) -> str:
    """Random words of at most n_tokens tokens, short of it by less than a word: both arms keep every pair whole
    (a longer answer is a row ftw drops as too long for sequence_len and TRL keeps)."""

    def count(words: list[str]) -> int:
        return len(tok(" " + " ".join(words), add_special_tokens=False)["input_ids"])

    words: list[str] = []
    while count(words) < n_tokens:
        words += rng.choices(WORDS, k=max(1, (n_tokens - count(words)) // 2))
    while count(words) > n_tokens:
        words.pop()
    return " ".join(words)


def write_pairs(path: Path, tokenizer_dir: Path, pairs: int, prompt: int, answer: int) -> None:
    from transformers import AutoTokenizer

    tok, rng = AutoTokenizer.from_pretrained(tokenizer_dir), random.Random(0)
    with path.open("w") as f:
        for _ in range(pairs):
            f.write(
                json.dumps(
                    {
                        "prompt": " " + text_of(tok, prompt, rng),
                        "chosen": " " + text_of(tok, answer, rng),
                        "rejected": " " + text_of(tok, answer, rng),
                    }
                )
                + "\n"
            )


# ---- arms (each runs in its own process: `python bench/dpo.py --arm NAME ...`) ---------------------
def ftw_arm(model_dir: Path, data: Path, work: Path, a: argparse.Namespace) -> dict:
    import yaml

    run_dir = work / "ftw-run"
    cfg = {
        "base_model": str(model_dir),
        "rl": "dpo",
        "rl_beta": MATCHED["beta"],
        "dpo_label_smoothing": MATCHED["label_smoothing"],
        "datasets": [
            {
                "path": str(data),
                "type": {"field_prompt": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"},
            }
        ],
        **LORA_16,
        "sequence_len": a.prompt + a.answer + 16,
        "micro_batch_size": a.mbs,
        "max_steps": a.warmup + a.steps,
        "learning_rate": a.lr,
        "optimizer": "adamw_torch_fused",
        **({"use_kernels": True} if a.use_kernels else {}),  # on CUDA they are on anyway
        **TIMED_RUN,
        **{k: MATCHED[k] for k in ("lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm", "seed")},
        **{k: MATCHED[k] for k in ("adam_beta1", "adam_beta2", "adam_epsilon")},
        "shuffle_merged_datasets": False,
        "dataset_prepared_path": str(work / "cache"),
    }
    (work / "ftw.yml").write_text(yaml.safe_dump(cfg))
    proc = ftw_train(work / "ftw.yml", run_dir, work, [model_dir, data.parent], a.arm_timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    steps = train_steps(run_dir, "loss")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = json.loads((run_dir / "prepared.json").read_text())["summary"]["rows"]
    if rows["dropped"] or rows["truncated"]:  # the arms would not train on the same pairs
        return {"error": f"ftw's preprocessing dropped or truncated pairs: {rows}"}
    last = a.warmup + a.steps
    step_s = seconds_per_step(steps, a.warmup, last)
    return {
        "pairs_per_s": round(a.mbs / step_s, 3),
        "ms_per_step": round(step_s * 1e3, 1),
        "peak_memory_gib": summary["peak_memory_gib"],
        "losses": [steps[step]["loss"] for step in sorted(steps)],
        "kernels": summary["kernels"],
    }


def trl_arm(model_dir: Path, data: Path, work: Path, a: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dev = device()
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if dev.type == "cuda" else None
            stamps.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
        attn_implementation="sdpa",
        device_map={"": dev},
    )
    args = DPOConfig(
        output_dir=str(work / "trl-out"),
        per_device_train_batch_size=a.mbs,
        max_steps=a.warmup + a.steps,
        learning_rate=a.lr,
        lr_scheduler_type=MATCHED["lr_scheduler"],
        warmup_steps=MATCHED["warmup_steps"],
        weight_decay=MATCHED["weight_decay"],
        adam_beta1=MATCHED["adam_beta1"],
        adam_beta2=MATCHED["adam_beta2"],
        adam_epsilon=MATCHED["adam_epsilon"],
        max_grad_norm=MATCHED["max_grad_norm"],
        optim="adamw_torch_fused" if dev.type == "cuda" else "adamw_torch",
        loss_type=["sigmoid"],
        beta=MATCHED["beta"],
        label_smoothing=MATCHED["label_smoothing"],
        bf16=dev.type == "cuda",
        max_length=a.prompt + 2 * a.answer + 16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        use_cpu=dev.type != "cuda",
        seed=MATCHED["seed"],
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tok,
        peft_config=lora,
        callbacks=[Stamp()],
    )
    trainer.train()
    step_s = (stamps[-1] - stamps[a.warmup - 1]) / a.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "pairs_per_s": round(a.mbs / step_s, 3),
        "ms_per_step": round(step_s * 1e3, 1),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "losses": losses,
    }


def reference_share(model_dir: Path, a: argparse.Namespace) -> dict:
    """The reference forward (adapter disabled, no grad) against a whole DPO step, on one packed micro-batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from schemas.config import TrainingConfig
    from worker.train.batches import collate
    from worker.train.preference import PreferenceObjective

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa"),
        LoraConfig(r=16, target_modules=TARGETS),
    )
    objective = PreferenceObjective(TrainingConfig(base_model="m", learning_rate=1e-4, adapter="lora", rl="dpo"), model)
    n, p = a.prompt + a.answer, a.prompt
    ids = torch.randint(5, 500, (2 * a.mbs * n,)).tolist()
    labels = [t if k % n >= p else -100 for k, t in enumerate(ids)]
    batch = collate([{"input_ids": ids, "labels": labels, "position_ids": list(range(n)) * (2 * a.mbs)}], 0, True)

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(a.steps):
            fn()
        return (time.perf_counter() - start) / a.steps

    step = timed(lambda: objective.loss(model, batch, torch.tensor(float(a.mbs)))[0].backward())
    reference = timed(lambda: objective.reference(model, batch))
    return {
        "step_ms": round(step * 1e3, 1),
        "reference_ms": round(reference * 1e3, 1),
        "reference_share": round(reference / step, 3),
    }


def run_arm(name: str, a: argparse.Namespace, model_dir: Path, data: Path) -> dict:
    env = dict(os.environ)
    if name == "trl" and a.trl_path:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (a.trl_path, str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")) if p
        )
    argv = [
        sys.executable,
        __file__,
        "--arm",
        name,
        "--work",
        str(a.work),
        "--shape",
        a.shape,
        "--mbs",
        str(a.mbs),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--prompt",
        str(a.prompt),
        "--answer",
        str(a.answer),
        "--arm-timeout",
        str(a.arm_timeout),
        "--lr",
        str(a.lr),
        *(["--use-kernels"] if a.use_kernels else []),
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=a.arm_timeout + 60)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or "")[-1500:]}
    return json.loads(lines[-1])


def table(results: dict, a: argparse.Namespace) -> str:
    base = results.get("trl", {})
    rows = [
        f"DPO LoRA, {a.shape}, {a.mbs} pairs/step of {a.prompt}+{a.answer}+{a.answer} tokens, {a.steps} timed steps, "
        f"lr {a.lr:g}",
        "| arm | pairs/s | ms/step | peak GiB | × trl pairs/s | × trl memory | loss step 1 | loss last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | error: {r['error'][-200:]!r} | | | | | | |")
            continue
        speed = r["pairs_per_s"] / base["pairs_per_s"] if base.get("pairs_per_s") else None
        mem = (
            r["peak_memory_gib"] / base["peak_memory_gib"]
            if base.get("peak_memory_gib") and r.get("peak_memory_gib")
            else None
        )
        rows.append(
            f"| {name} | {r['pairs_per_s']} | {r['ms_per_step']} | {r['peak_memory_gib']} | "
            f"{'' if speed is None else f'{speed:.2f}'} | {'' if mem is None else f'{mem:.2f}'} | "
            f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |"
        )
    curves = {name: r["losses"] for name, r in results.items() if "losses" in r}
    if len(curves) > 1:
        rows += ["", "loss by step: " + ", ".join(curves)]
        rows += [
            f"{i + 1:>3}  " + "  ".join(f"{c[i]:.4f}" for c in curves.values())
            for i in range(len(min(curves.values(), key=len)))
        ]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--mbs", type=int, default=4, help="pairs per step")
    ap.add_argument("--pairs", type=int, default=0, help="pairs in the file (default: enough for the steps)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--answer", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-6, help="both arms' learning rate (constant, no warmup)")
    ap.add_argument("--arms", default="ftw,trl")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder (default: /tmp/ftw-bench-dpo-SHAPE, one per shape: "
        "the ftw arm's run folder there belongs to one config)",
    )
    ap.add_argument(
        "--trl-path", default="", help="folder with trl installed (--target), added to the trl arm's PYTHONPATH"
    )
    ap.add_argument("--arm-timeout", type=int, default=900)
    ap.add_argument("--use-kernels", action="store_true", help="ftw arm: use_kernels: true (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)
    ap.add_argument(
        "--ref-share", action="store_true", help="measure the reference forward's share of a DPO step instead"
    )
    a = ap.parse_args()
    a.work = a.work or Path(f"/tmp/ftw-bench-dpo-{a.shape}")
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir, data = a.work / f"model-{a.shape}", a.work / "pairs.jsonl"
    if a.arm:
        fn = {"ftw": ftw_arm, "trl": trl_arm}[a.arm]
        print(json.dumps(fn(model_dir, data, a.work, a)))
        return 0
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, a.shape, a.prompt + 2 * a.answer + 16)
    if a.ref_share:
        print(json.dumps(reference_share(model_dir, a)))
        return 0
    write_pairs(data, model_dir, a.pairs or a.mbs * (a.warmup + a.steps), a.prompt, a.answer)
    results = {name: run_arm(name, a, model_dir, data) for name in a.arms.split(",")}
    print(table(results, a))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "dpo.json").write_text(
            json.dumps(
                {"shape": a.shape, "mbs": a.mbs, "prompt": a.prompt, "answer": a.answer, "results": results}, indent=1
            )
        )
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

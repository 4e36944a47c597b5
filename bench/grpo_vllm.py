"""GRPO with LoRA on one GPU: completions from vLLM (trl.use_vllm) against transformers' `generate`, same config.

    python bench/grpo_vllm.py --out OUT_DIR                          # Llama-3.2-1B shape, arms transformers,vllm
    python bench/grpo_vllm.py --shape tiny --prompts 2 --generations 2 --completion 8 --steps 2 --warmup 1   # CPU

A random-init model of a public shape (bench/models.py's build_model: bf16 safetensors, the tiny ByteLevel
tokenizer) and a JSONL of `--prompt`-token prompts (random words) with answers. Each arm is one
`python -m worker.cli train` of `rl: grpo` (LoRA r=16 α=32 on all linear layers, `--prompts` prompts a step,
`--generations` completions each of up to `--completion` tokens, temperature 1, the `length` reward so that
nothing ends early by design, beta 0.04) in a fresh process:
  transformers  trl.use_vllm false: the policy's own `generate` in the train process
  vllm          trl.use_vllm true: vLLM beside the trainer (vllm_gpu_memory_utilization --vllm-memory),
                the adapter synced every step (vllm_sync_interval 1); vLLM's start is before the first step
Timed from the per-step events after --warmup. Prints a table (ms/step, completion tokens/s, peak GiB of the
train process, ratios to transformers) and writes OUT_DIR/grpo_vllm.json.
vLLM must be importable by the Python in FTW_VLLM_PYTHON (default: this one); on a CPU machine its CPU build
(`make vllm-env`, then FTW_VLLM_PYTHON=.venv-vllm/bin/python).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
from bench.models import LORA_16, SHAPES, TIMED_RUN, build_model, ftw_train, seconds_per_step, train_steps  # noqa: E402

WORDS = "the quick brown fox jumps over lazy dog answer question hello world reverse copy upper lower sort".split()


def write_prompts(path: Path, rows: int, prompt_words: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            words = rng.choices(WORDS, k=prompt_words)
            f.write(json.dumps({"prompt": " ".join(words), "answer": " ".join(reversed(words))}) + "\n")


def arm(name: str, model_dir: Path, data: Path, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    import yaml

    run_dir = work / f"{name}-run"
    cfg = {
        "base_model": str(model_dir),
        "rl": "grpo",
        "chat_template": "chatml",
        "trl": {
            "num_generations": a.generations,
            "max_completion_length": a.completion,
            "reward_funcs": ["length"],
            "beta": 0.04,
            "temperature": 1.0,
            **(
                {"use_vllm": True, "vllm_sync_interval": 1, "vllm_gpu_memory_utilization": a.vllm_memory}
                if name == "vllm"
                else {}
            ),
        },
        "datasets": [{"path": str(data), "type": "prompt_answer"}],
        **LORA_16,
        "sequence_len": a.prompt * 2 + 32,
        "micro_batch_size": a.prompts,
        "max_steps": a.warmup + a.steps,
        "learning_rate": 1e-5,
        "optimizer": "adamw_torch",
        **TIMED_RUN,
        "dataset_prepared_path": str(work / "cache"),
    }
    (work / f"{name}.yml").write_text(yaml.safe_dump(cfg))
    proc = ftw_train(work / f"{name}.yml", run_dir, work, [model_dir, data.parent], a.arm_timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    steps = train_steps(run_dir, "reward")
    last = a.warmup + a.steps
    step_s = seconds_per_step(steps, a.warmup, last)
    timed = [steps[s] for s in range(a.warmup + 1, last + 1)]
    tokens = sum(e["completion_length"] for e in timed) / len(timed) * a.prompts * a.generations
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "ms_per_step": round(step_s * 1e3, 1),
        "completion_tokens_per_s": round(tokens / step_s, 1),
        "mean_completion_length": round(tokens / (a.prompts * a.generations), 1),
        "peak_memory_gib": summary.get("peak_memory_gib"),
    }


def table(results: dict[str, dict[str, Any]], a: argparse.Namespace) -> str:
    lines = [
        f"GRPO LoRA, {a.shape}, {a.prompts} prompts × {a.generations} completions of ≤ {a.completion} tokens a step, "
        f"{a.steps} timed steps",
        f"{'arm':<13}{'ms/step':>10}{'compl tok/s':>13}{'mean len':>10}{'peak GiB':>10}{'× transformers':>16}",
    ]
    base = results.get("transformers", {}).get("ms_per_step")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<13} failed: {r['error'][-300:]}")
            continue
        ratio = f"{base / r['ms_per_step']:.2f}" if base else "-"
        lines.append(
            f"{name:<13}{r['ms_per_step']:>10}{r['completion_tokens_per_s']:>13}{r['mean_completion_length']:>10}"
            f"{str(r['peak_memory_gib']):>10}{ratio:>16}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=8, help="prompts a step (micro_batch_size)")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--completion", type=int, default=256, help="max_completion_length")
    ap.add_argument("--prompt", type=int, default=64, help="words a prompt")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vllm-memory", type=float, default=0.3, help="trl.vllm_gpu_memory_utilization")
    ap.add_argument("--arms", default="transformers,vllm")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default /tmp/ftw-bench-grpo-SHAPE)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--arm-timeout", type=int, default=1800)
    a = ap.parse_args()
    work = (a.work or Path(f"/tmp/ftw-bench-grpo-{a.shape}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, a.shape, a.prompt * 2 + a.completion + 64)
    data = work / "prompts.jsonl"
    write_prompts(data, a.prompts * (a.warmup + a.steps), a.prompt)
    results = {name: arm(name, model_dir, data, work, a) for name in a.arms.split(",")}
    print(table(results, a))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "grpo_vllm.json").write_text(
            json.dumps({"args": vars(a) | {"work": str(work)}, **results}, default=str)
        )
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

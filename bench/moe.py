"""MoE LoRA training step on the GPU: transformers grouped_mm + PEFT, axolotl's ScatterMoE LoRA, ftw.

    python bench/moe.py                                  # OLMoE-1B-7B and Qwen3-30B-A3B shapes, every arm
    python bench/moe.py --shapes olmoe --steps 20
    python bench/moe.py --shapes qwen3-30b --layers 24   # fewer layers where all 48 do not fit one GPU
    python bench/moe.py --shapes olmoe --mbs 4            # 4 rows of 2048 tokens per step
    python bench/moe.py --shapes olmoe --profile          # + each arm's top CUDA kernels and host ops of one step
    python bench/moe.py --shapes tiny --seq 16 --layers 1 --warmup 1 --steps 1   # smoke test on CPU (Triton
                                                         # interpreted: 2048 tokens a step there take minutes)

Each arm runs in a fresh process (`--arm NAME`, one JSON line back) on the same random-init model
(bf16, seeded) and the same tokens: `--mbs` rows (1) of `--seq` tokens (2048), LoRA r=16 α=32 on
q/k/v/o and on the experts' gate_up_proj / down_proj (PEFT target_parameters), AdamW on the LoRA
parameters, no gradient checkpointing. Arms:
- peft: transformers' `grouped_mm` experts; PEFT forms W + B·A per expert tensor on every forward;
- axolotl: axolotl's ScatterMoE LoRA (`register_scattermoe_experts`, experts_implementation
  "scattermoe"), from its wheel: put axolotl (and `addict`) on PYTHONPATH; skipped when absent;
- ftw: ftw_kernels.apply_kernels with a job's TrainingConfig (pydantic: on the GPU machine from the wheels
  of bench/gpu_wheels.py) (ftw's LoRA experts, kernels/ftw_kernels/moe.py, with the GEMMs it picks
  by default: torch's grouped GEMM where it runs, bf16 on Hopper/Blackwell; each MoE block replayed as
  CUDA graphs, kernels/ftw_kernels/moe_graphs.py, as for a config with pad_to_sequence_len; and the dense
  kernels: norms, rope, fused LoRA q/k/v/o, varlen attention, fused linear cross-entropy);
- ftw-triton: the same with FTW_MOE_GEMM=triton (ftw's fused Triton GEMMs for the experts);
- ftw-eager: the same with FTW_MOE_GRAPHS=0 (the MoE blocks launched op by op, as before the graphs).
Timing: the wall time of `--steps` steps run back to back after `--warmup` steps, synchronised once
at the end (a training loop never waits for the GPU between steps; a step synchronised on its own
would also time the empty queue it starts with); tokens/s = mbs × seq / that mean. Peak:
torch.cuda.max_memory_allocated over the timed steps (weights included). loss0: the first step's
loss (the arms compute the same function: equal to ~1e-2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ("peft", "axolotl", "ftw", "ftw-triton", "ftw-eager")
ENV_OF_ARM = {"ftw": {}, "ftw-triton": {"FTW_MOE_GEMM": "triton"}, "ftw-eager": {"FTW_MOE_GRAPHS": "0"}}  # ftw's arms
# model_type, hidden, layers, heads, kv heads, head_dim, experts, top-k, expert width, vocab
SHAPES = {
    "olmoe": ("olmoe", 2048, 16, 16, 16, 128, 64, 8, 1024, 50304),
    "qwen3-30b": ("qwen3_moe", 2048, 48, 32, 4, 128, 128, 8, 768, 151936),
    "tiny": ("qwen3_moe", 64, 2, 2, 1, 32, 8, 2, 32, 256),
}


def model_config(shape: str, layers: int | None):
    from transformers import OlmoeConfig, Qwen3MoeConfig

    kind, hidden, n_layers, heads, kv, head_dim, experts, top_k, width, vocab = SHAPES[shape]
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers or n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_experts=experts,
        num_experts_per_tok=top_k,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    if kind == "olmoe":
        return OlmoeConfig(**common, intermediate_size=width)
    return Qwen3MoeConfig(
        **common,
        head_dim=head_dim,
        moe_intermediate_size=width,
        intermediate_size=4 * width,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    )


def lora_config():
    """What ftw's adapter builder makes of `lora_target_modules: [q_proj, k_proj, v_proj, o_proj]` and
    `lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]`, built with PEFT alone so
    that every arm, the peers' included, trains the same adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        task_type="CAUSAL_LM",
    )


def run_arm(arm: str, args) -> dict:
    """One arm in this process: build, patch, warm up, time."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(args.shape, args.layers), dtype=dtype)
    model.config.use_cache = False
    if arm == "axolotl":
        try:
            from axolotl.integrations.kernels.libs.scattermoe_lora.experts import register_scattermoe_experts
        except ImportError as e:
            return {"arm": arm, "skipped": f"axolotl is not importable ({e})"}
        register_scattermoe_experts()
    model = get_peft_model(model, lora_config())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)  # a live LoRA term, the same in every arm
    applied = []
    if arm in ENV_OF_ARM:
        from ftw_kernels import apply_kernels
        from schemas.config import TrainingConfig

        config = TrainingConfig(  # what a job of this LoRA runs: every row is --seq tokens (pad_to_sequence_len)
            base_model="bench",
            learning_rate=1e-5,
            adapter="lora",
            use_kernels=True,
            use_scattermoe=True,
            micro_batch_size=args.mbs,
            sequence_len=args.seq,
            pad_to_sequence_len=True,
        )
        applied = apply_kernels(model, config)
    elif arm == "axolotl":
        model.get_base_model().set_experts_implementation("scattermoe")
        applied = ["axolotl scattermoe"]
    else:
        model.get_base_model().set_experts_implementation("grouped_mm")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (args.mbs, args.seq), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    loss0 = float(step())
    for _ in range(args.warmup - 1):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()  # queued back to back, as a training loop runs them: a host-bound arm cannot hide behind a drain
    sync()
    step_s = (time.perf_counter() - t) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "arm": arm,
        "tokens_per_s": args.mbs * args.seq / step_s,
        "step_s": step_s,
        "peak_gib": peak,
        "loss0": loss0,
        "applied": applied,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        **({"profile": profile_step(step, sync, cuda=device.type == "cuda")} if args.profile else {}),
    }


def profile_step(step, sync, cuda: bool, top: int = 12) -> dict:
    """One more step under torch.profiler: the CUDA kernels' busy time against the step's wall time
    (a gap is host overhead), the kernels that took longest in all, and the host-side ops (their count
    and those whose own CPU time was longest: what a launch-bound step waits on; on CPU only these)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            t = time.perf_counter()
            step()
            sync()
            wall = time.perf_counter() - t
    except RuntimeError as e:  # no CUPTI here: the arm's timing stands without its profile
        return {"error": str(e)[:200]}
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]  # where a host-bound step waits
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": wall * 1e3,
        "cuda_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
        "top": [[e.key[:70], e.count, round(e.self_device_time_total / 1e3, 2)] for e in kernels[:top]],
        "host_ops": sum(e.count for e in host),
        "host_top": [[e.key[:70], e.count, round(e.self_cpu_time_total / 1e3, 2)] for e in host[:top]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["olmoe", "qwen3-30b"], choices=sorted(SHAPES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=1, help="rows of --seq tokens per step")
    parser.add_argument("--profile", action="store_true", help="also profile one step per arm (CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args)), flush=True)
        return 0
    env = dict(os.environ)
    if "tiny" in args.shapes and "TRITON_INTERPRET" not in env and not _has_cuda():  # set: no torch import here
        env.setdefault("TRITON_INTERPRET", "1")
    rows = []
    for shape in args.shapes:
        for arm in args.arms:
            if arm == "axolotl" and importlib.util.find_spec("axolotl") is None:  # skipped without a child
                rows.append({"shape": shape, "arm": arm, "skipped": "axolotl is not importable (no module 'axolotl')"})
                continue
            for name in ("FTW_MOE_GEMM", "FTW_MOE_GRAPHS"):
                env.pop(name, None)
            env.update(ENV_OF_ARM.get(arm, {}))
            cmd = (
                [
                    sys.executable,
                    __file__,
                    "--arm",
                    arm,
                    "--shape",
                    shape,
                    "--seq",
                    str(args.seq),
                    "--mbs",
                    str(args.mbs),
                    "--warmup",
                    str(args.warmup),
                    "--steps",
                    str(args.steps),
                ]
                + (["--layers", str(args.layers)] if args.layers else [])
                + (["--profile"] if args.profile else [])
            )
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                rows.append({"shape": shape, "arm": arm, "skipped": f"failed: {tail[0][:160]}"})
                continue
            rows.append({"shape": shape, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows, args))
    for r in (r for r in rows if "profile" in r):
        p = r["profile"]
        if "error" in p:
            print(f"\n{r['shape']} {r['arm']}: no profile ({p['error']})")
            continue
        print(f"\n{r['shape']} {r['arm']}: one step {p['wall_ms']:.1f} ms, CUDA kernels busy {p['cuda_ms']:.1f} ms")
        print("\n".join(f"  {ms:8.2f} ms  {n:5d}×  {name}" for name, n, ms in p["top"]))
        print(f"  host: {p['host_ops']} ops; their own CPU time, longest first:")
        print("\n".join(f"  {ms:8.2f} ms  {n:5d}×  {name}" for name, n, ms in p["host_top"]))
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def table(rows: list[dict], args) -> str:
    lines = [
        f"{args.mbs} × seq {args.seq}, LoRA r16 on q/k/v/o + experts, bf16, layers {args.layers or 'all'}, "
        f"mean of {args.steps} steps back to back",
        "",
        "| shape | arm | tokens/s | vs peft | peak GiB | loss0 | kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        base = next((r for r in rows if r["shape"] == shape and r["arm"] == "peft" and "tokens_per_s" in r), None)
        for r in (r for r in rows if r["shape"] == shape):
            if "tokens_per_s" not in r:
                lines.append(f"| {shape} | {r['arm']} | skipped: {r['skipped']} | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            lines.append(
                f"| {shape} | {r['arm']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_gib']:.1f} "
                f"| {r['loss0']:.4f} | {', '.join(r['applied']) or '-'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""`ftw train`'s real code path on one GPU against plain transformers+peft, in the same call.

    python bench/gpu_train.py --out OUT_DIR                                  # Llama-3.2-1B shape, all arms
    python bench/gpu_train.py --out OUT_DIR --shape llama-8b --arms hf,ftw --no-merge
    python bench/gpu_train.py --out OUT_DIR --shape tiny --steps 3 --warmup 1 --arms hf,ftw   # CPU dry run

A random-init model of a public shape (bench/train_throughput.py's SHAPES: llama-1b, llama-8b,
qwen-7b) is saved to a local folder (bf16 safetensors) and a prepared-data cache is written to
docs/contracts.md from train_throughput's token stream: each step's `--mbs` rows of `--seq`
tokens (lognormal samples, mean ~600, ≤ 2048, position_ids restarting per sample; mbs 8 for 1B,
4 for 7-8B as there) concatenated into one packed row of mbs × seq tokens — the row ftw's
preprocessing builds for micro_batch_size × sequence_len. Every arm trains LoRA r=16 α=32 on all
seven linear layers, bf16, on those same tokens, one process each:
  bare   bench/train_throughput.py's ftw arm: the kernels in a bare loop (batches on the GPU before
         timing, no clipping, events or checkpoints) on the same shape, mbs and token stream — the
         speed the real path must keep (issue 13: ftw ≥ 0.95× bare); its column "vs bare";
  hf     plain transformers+peft loop (sdpa, fused AdamW, grad clipping), each packed row viewed as
         its mbs rows of seq tokens (every one starts a sample, so this is exact and attention costs
         Σ sᵢ², as in train_throughput), batches on the GPU before timing, CUDA syncs after --warmup;
  ftw    `python -m worker.train` — the child `ftw train` runs — timed from its own per-step
         events (steps after --warmup), peak memory from its summary.json; merge_lora on unless
         --no-merge, timed. Then 3 more steps under torch.profiler (FTW_PROFILE_STEPS, not timed):
         GPU busy ms per step against the timed ms per step says whether the GPU waits for the host;
  ftw-nokernels  the same with use_kernels: false (the loop's own overhead against hf);
  qlora  ftw with adapter: qlora, load_in_4bit (bitsandbytes nf4), when importable: the fused LoRA
         functions over the 4-bit weights (kernels/ftw_kernels/qlora.py); bench/qlora.py sets it beside Unsloth.
  ftw-fp8  ftw with fp8_base_weights: true (the frozen Linears in float8, kernels/ftw_kernels/fp8.py; not in the
         default arms: it needs compute capability ≥ 8.9).
`--gc on|both|offload` runs the ftw-family arms with gradient_checkpointing (ARM+gc; ARM+offload with
the checkpoints in host memory, `gradient_checkpointing: offload`), `--full-length`
gives every row one sample of --seq tokens (the peers' protocol), `--model-dir` trains a saved model.
Prints a table and writes OUT_DIR/gpu_train.json. A later call on the same (warm) machine with the
same shape, mbs, seq and step counts reuses the model and cache under --work (e.g. one arm a call).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
from bench.train_throughput import DEFAULT_MBS, TARGETS, packed_batches  # noqa: E402
from bench.train_throughput import SHAPES as PUBLIC_SHAPES  # noqa: E402

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


# ---- arms -----------------------------------------------------------------------------------------
def hf_arm(model_dir: Path, cache: Path, warmup: int, steps: int, mbs: int, seq: int) -> dict:
    """The plain loop, in its own process (see main)."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = device()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", use_cache=False, device_map={"": dev}
    )
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=dev.type == "cuda")
    rows = load_from_disk(str(cache / "train")).with_format("torch")
    batches = []
    for i in range(warmup + steps):
        batch = {
            k: rows[i % len(rows)][k].long().view(mbs, seq).to(dev) for k in ("input_ids", "labels", "position_ids")
        }
        assert bool((batch["position_ids"][:, 0] == 0).all()), "every row of seq tokens must start a sample"
        batch["labels"][batch["position_ids"] == 0] = -100
        batches.append(batch)
    tokens, t0 = 0, None
    for i, batch in enumerate(batches):
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
    return {
        "tokens_per_s": round(tokens / dt),
        "ms_per_step": round(dt / steps * 1e3, 1),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "final_loss": round(float(loss), 4),
    }


def ftw_arm(name: str, model_dir: Path, cache: Path, work: Path, a: argparse.Namespace) -> dict:
    from schemas.config import TrainingConfig

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a warm machine keeps the last call's events
    run_dir.mkdir(parents=True)
    warmup, steps = a.warmup, a.steps
    profiled = PROFILED_STEPS if name in ("ftw", "qlora") and a.profile else 0
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": "bench.jsonl", "type": "completion"}],
        **LORA_16,
        "merge_lora": name == "ftw" and a.merge,
        # the profiled window starts one step after the last timed one: that step's event is not delayed by it
        "sequence_len": a.seq,
        "sample_packing": True,
        "micro_batch_size": a.mbs,
        "max_steps": warmup + steps + (profiled + 1 if profiled else 0),
        "learning_rate": 1e-4,
        "optimizer": "adamw_torch_fused",
        **TIMED_RUN,
    }
    if name == "ftw-nokernels":
        cfg["use_kernels"] = False
    if name.startswith("qlora"):
        cfg.update(adapter="qlora", load_in_4bit=True)
    if name.startswith("ftw-fp8"):
        cfg["fp8_base_weights"] = True
    if name.endswith("+gc"):
        cfg["gradient_checkpointing"] = True
    if name.endswith("+offload"):
        cfg["gradient_checkpointing"] = "offload"
    (run_dir / "config.json").write_text(TrainingConfig.model_validate(cfg).model_dump_json())
    path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "FTW_EVENTS": str(run_dir / "events.jsonl"),
        "FTW_ERROR_FILE": str(run_dir / "error.json"),
        "PYTHONPATH": path,
    }
    if profiled:
        env["FTW_PROFILE_STEPS"] = f"{warmup + steps + 1}:{warmup + steps + 1 + profiled}"
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "worker.train",
                str(run_dir / "config.json"),
                "--run-dir",
                str(run_dir),
                "--data",
                str(cache),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=a.arm_timeout,
        )
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {a.arm_timeout} s: {(e.stderr or b'')[-800:]!r}", "exit": None}
    wall = time.monotonic() - started
    if proc.returncode != 0:
        return {"error": (proc.stderr or "")[-1500:], "exit": proc.returncode}
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # per-step events only: the closing "done" event also carries the loss, after the outputs are written
    ts = {e["step"]: e["ts"] for e in events if e.get("stage") == "train" and "loss" in e and "event" not in e}
    summary = json.loads((run_dir / "summary.json").read_text())
    last = warmup + steps
    per_step = summary["tokens"] / summary["steps"]
    step_s = (ts[last] - ts[warmup]) / (last - warmup)
    result = {
        "tokens_per_s": round(per_step / step_s),
        "ms_per_step": round(step_s * 1e3, 1),
        "peak_memory_gib": summary["peak_memory_gib"],
        "final_loss": dict(summary["loss_curve"])[last],
        "kernels": summary["kernels"],
        "child_wall_s": round(wall, 1),
    }
    if profiled:
        result.update(profile_figures(run_dir / "profile.txt", profiled))
    merge = [e["ts"] for e in events if e.get("stage") == "merge"]
    done = [e["ts"] for e in events if e.get("event") == "done"]
    if merge and done:
        result["merge_s"] = round(done[-1] - merge[0], 1)
        result["merged_gib"] = round(
            sum(p.stat().st_size for p in (run_dir / "merged").glob("*.safetensors")) / 2**30, 2
        )
    return result


def bare_arm(a: argparse.Namespace) -> dict:
    """train_throughput's ftw arm (its own child process) in this table's units."""
    from bench import train_throughput

    args = [
        "--arm",
        "ftw",
        "--shape",
        a.shape,
        "--gc",
        "off",
        "--mbs",
        str(a.mbs),
        "--seq",
        str(a.seq),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
    ]
    r = train_throughput.child(args, timeout=a.arm_timeout)
    if "tokens_per_s" not in r:
        return {"error": r.get("error") or "no result"}
    return {
        "tokens_per_s": r["tokens_per_s"],
        "ms_per_step": round(a.mbs * a.seq / r["tokens_per_s"] * 1e3, 1),
        "peak_memory_gib": r["peak_alloc_gib"],
        "final_loss": r["loss_last"],
        "kernels": r["kernels"],
    }


def profile_figures(path: Path, steps: int) -> dict:
    """GPU busy time and host time per step from worker/train/profile.py's table. The host time
    is inflated by the profiler's own per-op cost: read it as an upper bound."""
    if not path.is_file():
        return {"profile": "missing"}
    text = path.read_text()
    walls = json.loads(re.search(r"step wall s: (\[.*?\])", text).group(1))
    out = {"profiled_host_ms_per_step": round(1e3 * sum(walls) / len(walls), 1)}
    gpu = re.search(r"Self CUDA time total: ([\d.]+)(us|ms|s)\n", text)
    if gpu:
        out["gpu_busy_ms_per_step"] = round(
            float(gpu.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[gpu.group(2)] / steps, 1
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftw-gpu-bench"))
    ap.add_argument(
        "--shape",
        default="llama-1b",
        choices=sorted(SHAPES),
        help="a public shape of bench/train_throughput.py, or tiny (CPU dry run)",
    )
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument(
        "--mbs",
        type=int,
        default=0,
        help="rows of --seq tokens per step (default: train_throughput's, 8 for 1B, 4 for 7-8B)",
    )
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--arms", default="hf,bare,ftw,qlora,ftw-nokernels")
    ap.add_argument(
        "--gc",
        default="off",
        choices=("off", "on", "both", "offload"),
        help="gradient_checkpointing for the ftw, qlora and ftw-nokernels arms (on: shown as ARM+gc; "
        "offload: checkpoints offloaded to host memory, as ARM+offload)",
    )
    ap.add_argument("--full-length", action="store_true", help="one sample of --seq tokens per row (no packing)")
    ap.add_argument(
        "--model-dir",
        type=Path,
        help="a saved model of --shape to train (bench/qlora.py passes the one Unsloth loads) instead of building one",
    )
    ap.add_argument(
        "--no-merge",
        dest="merge",
        action="store_false",
        help="ftw arm without merge_lora (saves minutes on 7-8B shapes)",
    )
    ap.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the ftw arm's 3 profiled steps after the timed ones",
    )
    ap.add_argument("--arm-timeout", type=int, default=0, help="seconds per arm (default: 150 for 1B, 420 for 7-8B)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run the hf arm in this process
    a = ap.parse_args()
    a.mbs = a.mbs or MBS[a.shape]
    a.arm_timeout = a.arm_timeout or (150 if a.shape in ("tiny", "llama-1b") else 420)
    model_dir, cache = a.model_dir or a.work / "model", a.work / "cache"
    if a.arm == "hf":
        print("RESULT " + json.dumps(hf_arm(model_dir, cache, a.warmup, a.steps, a.mbs, a.seq)), flush=True)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "shape": a.shape,
        "seq": a.seq,
        "mbs": a.mbs,
        "tokens_per_step": a.seq * a.mbs,
        "warmup": a.warmup,
        "steps": a.steps,
        "matmul_peak_tflops": matmul_peak_tflops(),
        "arms": {},
    }
    t = time.monotonic()
    spec = {
        "shape": a.shape,
        "seq": a.seq,
        "mbs": a.mbs,
        "rows": a.warmup + a.steps + PROFILED_STEPS + 1,
        "full_length": a.full_length,
        "model": str(a.model_dir or ""),
    }
    built = a.work / "built.json"  # a warm machine's earlier call with the same spec: model and cache reused
    if not built.is_file() or json.loads(built.read_text()) != spec:
        built.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        if a.model_dir is None:
            shutil.rmtree(model_dir, ignore_errors=True)
            build_model(model_dir, a.shape, a.seq)
        build_cache(cache, spec["rows"], a.mbs, a.seq, SHAPES[a.shape]["vocab_size"], a.full_length)
        built.write_text(json.dumps(spec))
    results["setup_s"] = round(time.monotonic() - t, 1)
    for arm in with_checkpointing(a.arms.split(","), a.gc):
        print(f"--- {arm}", flush=True)
        if arm == "hf":
            try:
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--arm",
                        "hf",
                        "--out",
                        str(a.out),
                        "--work",
                        str(a.work),
                        "--shape",
                        a.shape,
                        "--mbs",
                        str(a.mbs),
                        "--seq",
                        str(a.seq),
                        "--warmup",
                        str(a.warmup),
                        "--steps",
                        str(a.steps),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=a.arm_timeout,
                )
                line = [row for row in proc.stdout.splitlines() if row.startswith("RESULT ")]
                results["arms"][arm] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-1500:]}
            except subprocess.TimeoutExpired:
                results["arms"][arm] = {"error": f"timed out after {a.arm_timeout} s"}
        elif arm == "bare":
            results["arms"][arm] = bare_arm(a)
        elif arm.startswith("qlora") and not _has_cuda_bnb():
            results["arms"][arm] = {"error": "bitsandbytes with CUDA not available"}
        else:
            results["arms"][arm] = ftw_arm(arm, model_dir, cache, a.work, a)
        print(json.dumps(results["arms"][arm])[:2000], flush=True)
        (a.out / "gpu_train.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def with_checkpointing(arms: list[str], gc: str) -> list[str]:
    """The arms to run: ftw, qlora and ftw-nokernels as ARM+gc (gradient_checkpointing on) for --gc on,
    as both for --gc both, as ARM+offload for --gc offload; hf and bare as they are."""
    out = []
    for arm in arms:
        if arm not in ("ftw", "qlora", "ftw-nokernels") or gc == "off":
            out.append(arm)
        else:
            out += {"on": [f"{arm}+gc"], "both": [arm, f"{arm}+gc"], "offload": [f"{arm}+offload"]}[gc]
    return out


def _has_cuda_bnb() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def table(r: dict) -> str:
    base = r["arms"].get("hf", {}).get("tokens_per_s")
    bare = r["arms"].get("bare", {}).get("tokens_per_s")
    lines = [
        f"{r['shape']}, {r['mbs']} × {r['seq']} tokens a step",
        "| arm | tokens/s | vs hf | vs bare | ms/step | GPU busy ms/step (profiled) | peak GiB | loss at the last "
        "timed step | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for arm, v in r["arms"].items():
        if "error" in v:
            lines.append(
                f"| {arm} | — | — | — | — | — | — | — | failed: "
                f"{v['error'].strip().splitlines()[-1][:120] if v['error'].strip() else v.get('exit')} |"
            )
            continue
        ratio = f"{v['tokens_per_s'] / base:.2f}×" if base else "—"
        vs_bare = f"{v['tokens_per_s'] / bare:.2f}×" if bare else "—"
        notes = ", ".join(
            filter(
                None,
                [
                    f"kernels: {'+'.join(v['kernels']) or 'none'}" if "kernels" in v else "",
                    f"merge {v['merge_s']} s → {v['merged_gib']} GiB" if "merge_s" in v else "",
                    f"host ≤ {v['profiled_host_ms_per_step']} ms/step (profiled)"
                    if "profiled_host_ms_per_step" in v
                    else "",
                ],
            )
        )
        lines.append(
            f"| {arm} | {v['tokens_per_s']:,} | {ratio} | {vs_bare} | {v['ms_per_step']} | "
            f"{v.get('gpu_busy_ms_per_step', '—')} | {v['peak_memory_gib']} | {v['final_loss']} | {notes} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

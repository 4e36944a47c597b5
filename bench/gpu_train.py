"""`ftw train`'s real code path on one GPU against plain transformers+peft, in the same call.

    python bench/gpu_train.py --out OUT_DIR                                  # Llama-3.2-1B shape, all arms
    python bench/gpu_train.py --out OUT_DIR --shape llama-8b --arms hf,ftw --no-merge
    python bench/gpu_train.py --out OUT_DIR --shape tiny --steps 3 --warmup 1 --arms hf,ftw   # CPU dry run

A random-init model of a public shape (bench/models.py's SHAPES: llama-1b, llama-8b,
qwen-7b) is saved to a local folder (bf16 safetensors) and a prepared-data cache is written to
docs/contracts.md from bench/models.py's token stream: each step's `--mbs` rows of `--seq`
tokens (lognormal samples, mean ~600, ≤ 2048, position_ids restarting per sample; mbs 8 for 1B,
4 for 7-8B as there) concatenated into one packed row of mbs × seq tokens — the row ftw's
preprocessing builds for micro_batch_size × sequence_len. Every arm trains LoRA r=16 α=32 on all
seven linear layers, bf16, on those same tokens, one process each:
  bare   bench/train_throughput.py's ftw arm: the kernels in a bare loop (batches on the GPU before
         timing, no clipping, events or checkpoints) on the same shape, mbs and token stream — the
         speed the real path must keep (issue 13: ftw ≥ 0.95× bare); its column "vs bare";
  bare-fresh  the same without its replay on --unpacked rows: each step's lengths met for the first time inside the
         timed steps, as a real run meets them (what new token counts cost: docs/benchmarks.md, "fourteenth session");
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
  ftw-unjoined  ftw with FTW_JOIN_STEPS=0: an unpacked run's accumulated micro-batches (--accum) each a pass of its
         own, as before their samples were joined up to the run's largest micro-batch (worker/train/batches.joined);
  ftw-nographs  ftw with FTW_MOE_GRAPHS=0: a MoE shape's blocks launched op by op, not replayed as
         CUDA graphs (kernels/ftw_kernels/moe_graphs.py);
  qlora-fp8  qlora with fp8_base_weights: true: the 4-bit weights' matmuls in float8;
  ftw-fp8  ftw with fp8_base_weights: true (the frozen Linears in float8, kernels/ftw_kernels/fp8.py; not in the
         default arms: it needs compute capability ≥ 8.9).
`--unpacked` writes one sample a row (sample_packing: false; the trainer joins each micro-batch's samples into one
row, the bare arm as well). `--prompt-share 0.5` makes the first half of every sample a masked prompt (chat data;
ftw's loss head then computes the target rows only). `--gc on|both|offload` runs the ftw-family arms with
gradient_checkpointing (ARM+gc; ARM+offload with the checkpoints in host memory, `gradient_checkpointing:
offload`), `--full-length` gives every row one sample of --seq tokens (the peers' protocol), `--model-dir` trains
a saved model.
Prints a table and writes OUT_DIR/gpu_train.json. A later call on the same (warm) machine with the
same shape, mbs, seq and step counts reuses the model and cache under --work (e.g. one arm a call).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
from bench.gpu_train_arms import bare_arm, cpu_times, ftw_arm, has_cuda_bnb, hf_arm, host_load  # noqa: E402
from bench.host_samples import sampler  # noqa: E402
from bench.models import (  # noqa: E402
    MBS,
    PROFILED_STEPS,
    SHAPES,
    build_cache,
    build_model,
    matmul_peak_tflops,
)


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
    ap.add_argument(
        "--accum",
        type=int,
        default=1,
        help="gradient_accumulation_steps of the ftw-family arms: a step reads --mbs × --accum samples",
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
        "--unpacked",
        action="store_true",
        help="sample_packing: false: one sample a row (ftw's trainer joins each micro-batch's into one row)",
    )
    ap.add_argument(
        "--prompt-share",
        type=float,
        default=0.0,
        help="the share of each sample that is a masked prompt (labels -100), as in chat data: every arm trains on it",
    )
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
    ap.add_argument(
        "--config",
        type=json.loads,
        default={},
        help="JSON merged into every ftw-family arm's training config, e.g. "
        '\'{"gradient_checkpointing_kwargs": {"use_reentrant": true}}\'',
    )
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run the hf arm in this process
    a = ap.parse_args()
    sampler()  # HOST_SAMPLES without py-spy stops here, before the model and data are built
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
        "accum": a.accum,
        "tokens_per_step": a.seq * a.mbs * a.accum,
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
        "rows": (a.warmup + a.steps + PROFILED_STEPS + 1) * a.accum,
        "full_length": a.full_length,
        "prompt_share": a.prompt_share,
        "unpacked": a.unpacked,
        "model": str(a.model_dir or ""),
    }
    built = a.work / "built.json"  # a warm machine's earlier call with the same spec: model and cache reused
    if not built.is_file() or json.loads(built.read_text()) != spec:
        built.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        if a.model_dir is None:
            shutil.rmtree(model_dir, ignore_errors=True)
            build_model(model_dir, a.shape, a.seq)
        vocab = SHAPES[a.shape]["vocab_size"]
        build_cache(cache, spec["rows"], a.mbs, a.seq, vocab, a.full_length, a.prompt_share, a.unpacked)
        built.write_text(json.dumps(spec))
    results["setup_s"] = round(time.monotonic() - t, 1)
    for arm in with_checkpointing(a.arms.split(","), a.gc):
        print(f"--- {arm}", flush=True)
        cpu_before = cpu_times()
        if arm == "hf" and a.unpacked:
            results["arms"][arm] = {"error": "the hf arm reads packed rows only (--unpacked: arms bare, ftw)"}
        elif arm == "hf":
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
        elif arm in ("bare", "bare-fresh"):
            results["arms"][arm] = bare_arm(a, replay=arm == "bare")
        elif arm.startswith("qlora") and not has_cuda_bnb():
            results["arms"][arm] = {"error": "bitsandbytes with CUDA not available"}
        else:
            results["arms"][arm] = ftw_arm(arm, model_dir, cache, a.work, a)
        results["arms"][arm].update(host_load(cpu_before, cpu_times()))  # over the arm's whole process
        print(json.dumps(results["arms"][arm])[:2000], flush=True)
        (a.out / "gpu_train.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def with_checkpointing(arms: list[str], gc: str) -> list[str]:
    """The arms to run: ftw's real-path arms (all but hf and bare) as ARM+gc (gradient_checkpointing on)
    for --gc on, as both for --gc both, as ARM+offload for --gc offload; hf and bare as they are."""
    out = []
    for arm in arms:
        if arm in ("hf", "bare", "bare-fresh") or gc == "off":
            out.append(arm)
        else:
            out += {"on": [f"{arm}+gc"], "both": [arm, f"{arm}+gc"], "offload": [f"{arm}+offload"]}[gc]
    return out


def table(r: dict) -> str:
    base = r["arms"].get("hf", {}).get("tokens_per_s")
    bare = r["arms"].get("bare", {}).get("tokens_per_s")
    lines = [
        f"{r['shape']}, {r['mbs']} × {r['seq']} tokens a micro-batch, {r.get('accum', 1)} a step",
        "| arm | tokens/s | vs hf | vs bare | ms/step (the steps' median: a first step that still compiled weighs "
        "less) | GPU busy ms/step (profiled) | peak GiB (the steps' / the "
        "process's, loading included) | loss at the last timed step | notes |",
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
                    f"by the events' timestamps {v['ms_per_step_by_timestamps']} ms/step"
                    if "ms_per_step_by_timestamps" in v
                    else "",
                    f"GPU busy {v['gpu_busy_share']:.0%} at {v.get('gpu_sm_clock_mhz')} MHz"
                    if "gpu_busy_share" in v
                    else "",
                    f"{v['cpus_busy']} CPUs busy, steal {v['cpu_steal_share']:.1%}" if "cpus_busy" in v else "",
                ],
            )
        )
        peak = v["peak_memory_gib"]
        if v.get("step_peak_memory_gib") is not None:
            peak = f"{v['step_peak_memory_gib']} / {peak}"
        each = [ms for ms in v.get("step_ms_each") or [] if ms is not None]
        ms = f"{v['ms_per_step']} (median {statistics.median(each):.1f})" if each else v["ms_per_step"]
        lines.append(
            f"| {arm} | {v['tokens_per_s']:,} | {ratio} | {vs_bare} | {ms} | "
            f"{v.get('gpu_busy_ms_per_step', '—')} | {peak} | {v['final_loss']} | {notes} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

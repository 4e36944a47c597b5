"""The kernel warm-up's compiles side by side against one after another (kernels/ftw_kernels/precompile.py).

A fresh worker's first step compiles each Triton kernel as it first launches, one after another. The warm-up now
records a one-layer pass's kernels and compiles them in worker processes. This builds the warm-up's one-layer model
of a public shape (random weights, this repo's tiny tokenizer), records its kernels once, and compiles them into an
empty Triton cache per arm, in alternating rounds: one after another in this process, as the first step would, and
side by side in N processes. On a machine without a GPU the pass records for `--target` (sm_90: an H100's or
H200's) over CPU tensors; there its kernels take the tiles the CPU path picks, so the set differs from a GPU's.

    .venv/bin/python bench/parallel_compile.py                          # llama-1b's layer, workers 1 and 2
    python bench/parallel_compile.py --workers 1,4,8,15 --seq 2048      # on the device machine (16 cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
os.environ.setdefault("TRITON_INTERPRET", "0")  # the JIT, not the interpreter: its kernels are what is compiled
import contextlib  # noqa: E402

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from bench.models import PUBLIC_SHAPES  # noqa: E402
from ftw_kernels import precompile  # noqa: E402
from schemas.config import TrainingConfig  # noqa: E402
from worker.devtools.tiny import build_model  # noqa: E402
from worker.train.batches import host_inputs  # noqa: E402
from worker.train.warmup import batches, build, passes  # noqa: E402


def record(args, folder: Path) -> list[precompile.Recorded]:
    shape = PUBLIC_SHAPES[args.shape]
    model_dir = build_model(
        folder / "model",
        hidden=shape["hidden_size"],
        layers=1,
        heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"],
        intermediate=shape["intermediate_size"],
        max_positions=max(2048, args.seq),
    )
    cfg = TrainingConfig.model_validate(
        {
            "base_model": str(model_dir),
            "learning_rate": 1e-4,
            "adapter": args.adapter,
            "load_in_4bit": args.adapter == "qlora",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_target_linear": True,
            "sequence_len": args.seq,
            "micro_batch_size": args.mbs,
            "sample_packing": True,
            "use_kernels": True,
            "bf16": True,
        }
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, precision, kernels = build(cfg, device)
    micro_batches = batches(cfg, tokenizer)
    for micro in micro_batches:
        micro.update(host_inputs(micro, "varlen_attention" in kernels, "fused_linear_cross_entropy" in kernels))
    with precompile.recording() as recorded:
        passes(model, micro_batches, precision, device)
    return recorded


def compile_all(recorded: list[precompile.Recorded], workers: int, cache: Path, each: dict[str, float]) -> float:
    """Seconds to compile `recorded` into the empty `cache`: one after another here (workers 0; each kernel's seconds
    added to `each`), or side by side."""
    knobs.cache.dir = str(cache)
    started = time.monotonic()
    if workers == 0:
        failed = []
        for item in recorded:
            began = time.monotonic()
            failed += filter(None, [precompile.compile_one(item).error])
            each[item.name] = each.get(item.name, 0.0) + time.monotonic() - began
    else:
        failed = precompile.compile_side_by_side(recorded, workers).failed
    if failed:
        raise SystemExit(f"{len(failed)} kernels did not compile: {failed[:2]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(PUBLIC_SHAPES))
    parser.add_argument("--adapter", default="lora", choices=["lora", "qlora"])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="the side-by-side arms' process counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--target", default="cuda:90:32", help="backend:arch:warp size, where no GPU is present")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftw-parallel-compile-") as tmp:
        folder = Path(tmp)
        knobs.cache.dir = str(folder / "recording")
        if torch.cuda.is_available():
            where, target = torch.cuda.get_device_name(), contextlib.nullcontext()
        else:
            backend, arch, warp = args.target.split(":")
            where, target = (
                f"no GPU here: recorded for {backend} sm_{arch}",
                precompile.offline(GPUTarget(backend, int(arch), int(warp))),
            )
        with target:
            recorded = record(args, folder)
            arms = [0, *(int(w) for w in args.workers.split(","))]
            seconds: dict[int, list[float]] = {arm: [] for arm in arms}
            each: dict[str, float] = {}  # a kernel's specialisations, one after another, summed over the rounds
            for round_ in range(args.rounds):
                for arm in arms if round_ % 2 == 0 else arms[::-1]:
                    seconds[arm].append(compile_all(recorded, arm, folder / f"cache-{arm}-{round_}", each))
    kernels = len({r.name for r in recorded})
    print(
        f"\n{args.shape}'s layer, {args.adapter}, {args.mbs} × {args.seq} packed; {where}; {os.cpu_count()} CPUs; "
        f"{len(recorded)} specialisations of {kernels} kernels\n"
    )
    print("| arm | processes | seconds by round | × one after another |")
    print("|---|---:|---|---:|")
    base = statistics.mean(seconds[0])
    for arm in arms:
        name = "one after another (the first step's way)" if arm == 0 else "side by side"
        by_round = ", ".join(f"{s:.2f}" for s in seconds[arm])
        print(f"| {name} | {max(arm, 1)} | {by_round} | {base / statistics.mean(seconds[arm]):.2f}× |")
    print("\nThe kernels by compile time (one after another, all their specialisations, mean of the rounds):")
    for name, total in sorted(each.items(), key=lambda kv: -kv[1]):
        count = sum(r.name == name for r in recorded)
        print(f"  {name}: {total / args.rounds:.2f} s for {count}")


if __name__ == "__main__":
    main()

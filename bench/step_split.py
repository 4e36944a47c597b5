"""Where a training step's GPU time goes, by kind of work, for the traces bench/train_throughput.py --profile writes
(bench/gpu_step.sh's `profile` part: three steps an arm). Each arm's kernels are put in one of a few kinds by their
names: the full-width GEMMs (every tile side ≥ 128: the projections' and the output head's, the same cuBLAS kernels in
both tools), the rank-sized GEMMs (LoRA's: a tile side < 128, and cuBLAS's split-K reductions), attention, SwiGLU,
the norms, RoPE, the loss, the optimizer, copies and fills, the rest. With each arm's mean power (W, the tokens
table's) the table also gives its energy a step, which is what a step at the power cap is bound by. Where the trace
holds the ops' shapes (bench/step_probes.py records them since 2026-12-06's ninth session), a GEMM kernel is told
by its op's matrices instead of its tile: rank-sized when one side is under RANK_SIDE (cuBLAS also runs some
rank-sized products, e.g. Σr × hidden A grads, on full-width tiles).

  python bench/step_split.py ftw=OUT/prof-llama-8b-gcoff.txt.trace.json.gz \\
      unsloth=OUT/prof-llama-8b-gcoff-unsloth.txt.trace.json.gz --watts ftw=696.95,unsloth=693.55
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict

ATTENTION = ("sdpa", "fmha", "flash", "cudnn::fusion", "attention")  # before the GEMMs: their templates name cutlass
KINDS = (  # (kind, name patterns), first match wins; the GEMMs are told apart by `kind_of`
    ("attention", ATTENTION),
    ("SwiGLU", ("swiglu", "_fg_kernel", "sigmoid", "silu")),
    ("norms", ("rmsnorm", "rms_layernorm", "layer_norm", "layernorm")),
    ("RoPE", ("rope", "rotary")),
    ("loss", ("_ce_", "cross_entropy", "logsumexp", "nll")),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("copies and fills", ("memcpy", "memset", "copy_kernel", "fillfunctor", "catarray")),
)
GEMM = re.compile(r"(nvjet|gemm|xmma|cutlass|splitkreduce)", re.IGNORECASE)
TILE = re.compile(r"_(\d+)x(\d+)_")
RANK_SIDE = 256  # a matrix side under this is a LoRA rank (Σr of a stacked group included), not a model width


def kind_of(name: str, dims: list | None = None) -> str:
    """The kind of one kernel; `dims`: its op's "Input Dims" where the trace recorded them."""
    low = name.lower()
    if GEMM.search(name) and not any(p in low for p in ATTENTION):
        sides = [n for shape in dims or [] if len(shape) == 2 for n in shape]
        if sides:
            full = min(sides) >= RANK_SIDE
        else:
            tile = TILE.search(name)
            full = tile is not None and min(int(tile[1]), int(tile[2])) >= 128 and "splitk" not in low
        return "GEMMs, full width" if full else "GEMMs, rank-sized (LoRA)"
    for kind, patterns in KINDS:
        if any(p in low for p in patterns):
            return kind
    return "other"


def split(path: str, steps: int) -> dict[str, float]:
    """ms a step of each kind in one arm's trace."""
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    dims = {  # a CPU op's id → its inputs' shapes (a kernel carries the id of the op that launched it)
        e["args"]["External id"]: e["args"]["Input Dims"]
        for e in events
        if e.get("cat") == "cpu_op" and "Input Dims" in e.get("args", {})
    }
    ms: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            ms[kind_of(e["name"], dims.get(e.get("args", {}).get("External id")))] += e["dur"] / 1e3 / steps
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", help="LABEL=PATH of each arm's trace (.trace.json.gz)")
    ap.add_argument("--steps", type=int, default=3, help="steps in each trace (bench/step_probes.py: 3)")
    ap.add_argument("--watts", default="", help="LABEL=W,...: each arm's mean power, for the energy row")
    a = ap.parse_args()

    def pairs(items: list[str], what: str) -> dict[str, str]:
        if not all("=" in item for item in items):
            ap.error(f"expected {what} pairs, got {items}")
        return dict(item.split("=", 1) for item in items)

    arms = pairs(a.traces, "LABEL=PATH")
    try:
        watts = {k: float(v) for k, v in pairs([w for w in a.watts.split(",") if w], "LABEL=W").items()}
    except ValueError:
        ap.error(f"--watts: each W must be a number, got {a.watts}")
    splits = {label: split(path, a.steps) for label, path in arms.items()}
    kinds = ["GEMMs, full width", "GEMMs, rank-sized (LoRA)", *(k for k, _ in KINDS), "other"]
    labels = list(splits)
    print("| ms a step | " + " | ".join(labels) + " | " + " | ".join(f"share, {x}" for x in labels) + " |")
    print("|---" * (1 + 2 * len(labels)) + "|")
    totals = {x: sum(splits[x].values()) for x in labels}
    for kind in kinds:
        cells = [f"{splits[x].get(kind, 0.0):.1f}" for x in labels]
        shares = [f"{100 * splits[x].get(kind, 0.0) / totals[x]:.1f}%" for x in labels]
        print(f"| {kind} | " + " | ".join(cells) + " | " + " | ".join(shares) + " |")
    print("| **GPU busy** | " + " | ".join(f"**{totals[x]:.1f}**" for x in labels) + " |" + " |" * len(labels))
    if watts:
        cells = [f"{totals[x] * watts[x] / 1e3:.0f}" if x in watts else "" for x in labels]
        print("| J a step (busy ms × mean W) | " + " | ".join(cells) + " |" + " |" * len(labels))


if __name__ == "__main__":
    main()

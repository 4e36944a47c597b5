"""One change's effect on the training step: this tree against older ones, interleaved in one device call.

A change's step figure is only worth the noise it beats, and two device calls differ by a few percent (the
power cap, the machine): so the trees run in the same call, in rounds whose order rotates (new, old₁, old₂;
then old₁, old₂, new; …) and, with two trees, alternates (new then old, old then new, …), to spread any drift
over all of them. Each run is bench/train_throughput.py, a fresh process, from its own tree (its own `bench/`,
`kernels/` and `worker/` first on PYTHONPATH). Several `--old` trees share the new tree's runs: one call
measures a change against the tree before it and against a variant of it.

    git archive REV kernels bench schemas worker | (mkdir -p .gpu/old && tar -x -C .gpu/old)   # here
    python3 bench/tree_ab.py --old .gpu/old --shapes llama-1b,llama-8b --rounds 2               # on the GPU
    python3 bench/tree_ab.py --old .gpu/main --old .gpu/variant --rounds 2                       # two older trees
    python3 bench/tree_ab.py --old .gpu/old --shapes llama-8b --gc offload --steps 6             # memory-saving mode
    python3 bench/tree_ab.py --old .gpu/old --shapes llama-8b --lora-dropout 0.05                # LoRA's dropout
    python3 bench/tree_ab.py --old .gpu/old --shapes llama-8b --unpacked --steps 8               # short steps

`--site /tmp/site` puts wheels installed there (`.whl-qlora`: pydantic for worker/) ahead of every tree.
Prints, per shape and round, each run's tokens/s, step ms, SM clock and power, and the new tree's ratio over
each old one, and per old tree the geometric mean of its rounds' ratios."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(tree: Path, shape: str, args: argparse.Namespace) -> dict:
    """tokens/s and step ms of one bench/train_throughput.py run from `tree` (an error's first line instead)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        paths = [args.site] if args.site else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(tree), str(tree / "kernels")])}
        rows = ["--unpacked", "--replay"] if args.unpacked else ["--full-length"]
        command = [
            sys.executable, str(tree / "bench" / "train_throughput.py"), *rows, "--shapes", shape,
            "--arms", args.arm, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--arm-timeout", str(args.arm_timeout), "--json", str(out),
            "--gc", "off" if args.gc == "off" else "on", *(["--offload"] if args.gc == "offload" else []),
            *(["--lora-dropout", str(args.lora_dropout)] if args.lora_dropout else []),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
        # the arm's own error when it failed; the bench's stderr when it wrote no result at all
        result = (json.loads(out.read_text()) if out.exists() else [{"error": done.stderr}])[0]
        if "tokens_per_s" not in result:
            lines = [line for line in str(result.get("error")).splitlines() if line.strip()] or ["no result"]
            return {"error": lines[-1][:160]}
        return {key: result.get(key) for key in ("tokens_per_s", "step_ms", "sm_mhz", "power_w")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--old",
        type=Path,
        action="append",
        required=True,
        help="an older tree (kernels, bench, schemas, worker); again for more",
    )
    ap.add_argument("--new", type=Path, default=REPO, help="the newer tree (default: this one)")
    ap.add_argument("--shapes", default="llama-1b")
    ap.add_argument("--arm", default="ftw", help="bench/train_throughput.py's arm: ftw or ftw-fp8")
    ap.add_argument("--rounds", "--pairs", type=int, default=2, help="each round runs every tree once")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--arm-timeout", type=int, default=150)
    ap.add_argument(
        "--gc", choices=("off", "on", "offload"), default="off", help="checkpointing; offload: layer inputs on the host"
    )
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="every run's lora_dropout (the trees must take it)")
    ap.add_argument(
        "--unpacked",
        action="store_true",
        help="short steps: unpacked samples joined padding-free, timed past their shapes' compiles (--replay; the "
        "trees' bench must take it)",
    )
    ap.add_argument("--site", help="a folder of installed wheels to put first on PYTHONPATH")
    args = ap.parse_args()
    for tree in (args.new, *args.old):  # before any device time is spent on the others
        if not (tree / "bench" / "train_throughput.py").is_file():
            ap.error(
                f"{tree} holds no bench/train_throughput.py: give a tree that "
                "`git archive REV kernels bench schemas worker` unpacked"
            )
    olds = [f"old{i + 1}" if len(args.old) > 1 else "old" for i in range(len(args.old))]
    trees = {"new": args.new.resolve(), **{name: path.resolve() for name, path in zip(olds, args.old)}}
    for name in olds:
        print(f"{name}: {trees[name]}")
    heads = " | ".join(f"{name} tok/s (step ms; SM MHz / W) | new / {name}" for name in olds)
    print(f"| shape | round | order | new tok/s (step ms; SM MHz / W) | {heads} |")
    print("|---|---|---|---:|" + "---:|---:|" * len(olds))
    failed = False
    for shape in args.shapes.split(","):
        ratios: dict[str, list[float]] = {name: [] for name in olds}
        for round_ in range(args.rounds):
            names = list(trees)
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            got = {name: run(trees[name], shape, args) for name in order}
            failed |= any("error" in v for v in got.values())
            cells = []
            for name in olds:
                ratio = "-"
                if "error" not in got["new"] and "error" not in got[name]:
                    ratios[name].append(got["new"]["tokens_per_s"] / got[name]["tokens_per_s"])
                    ratio = f"{ratios[name][-1]:.3f}×"
                cells += [_result(got[name]), ratio]
            print(
                f"| {shape} | {round_ + 1} | {' → '.join(order)} | {_result(got['new'])} | {' | '.join(cells)} |",
                flush=True,
            )
        means = []
        for name in olds:
            mean = math.exp(sum(map(math.log, ratios[name])) / len(ratios[name])) if ratios[name] else None
            means += ["", f"**{mean:.3f}×**" if mean else "-"]
        print(f"| {shape} | geometric mean | | | {' | '.join(means)} |", flush=True)
    return 1 if failed else 0


def _result(got: dict) -> str:
    """tokens/s (step ms; the SM clock and power the GPU held while the steps ran: a step at the power cap that
    does less memory-bound work runs its GEMMs at a lower clock)."""
    if "error" in got:
        return f"failed: {got['error']}"
    return f"{got['tokens_per_s']:,} ({got['step_ms']:.1f}; {got['sm_mhz'] or '-'} / {got['power_w'] or '-'})"


if __name__ == "__main__":
    raise SystemExit(main())

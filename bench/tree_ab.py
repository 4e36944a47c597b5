"""One change's effect on the training step: this tree against an older one, interleaved in one device call.

A change's step figure is only worth the noise it beats, and two device calls differ by a few percent (the
power cap, the machine): so both trees run in the same call, in pairs whose order alternates (new then old,
old then new, …) to spread any drift over both. Each run is bench/train_throughput.py, a fresh process, from
its own tree (its own `bench/`, `kernels/` and `worker/` first on PYTHONPATH).

    git archive REV kernels bench schemas worker | (mkdir -p .gpu/old && tar -x -C .gpu/old)   # here
    python3 bench/tree_ab.py --old .gpu/old --shapes llama-1b,llama-8b --pairs 2                # on the GPU

`--site /tmp/site` puts wheels installed there (`.whl-qlora`: pydantic for worker/) ahead of both trees.
Prints, per shape, each run's tokens/s and step ms, and the new tree's ratio over the old per pair and as
the geometric mean."""

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
        command = [
            sys.executable, str(tree / "bench" / "train_throughput.py"), "--full-length", "--shapes", shape,
            "--arms", args.arm, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--arm-timeout", str(args.arm_timeout), "--json", str(out),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
        # the arm's own error when it failed; the bench's stderr when it wrote no result at all
        result = (json.loads(out.read_text()) if out.exists() else [{"error": done.stderr}])[0]
        if "tokens_per_s" not in result:
            lines = [line for line in str(result.get("error")).splitlines() if line.strip()] or ["no result"]
            return {"error": lines[-1][:160]}
        return {"tokens_per_s": result["tokens_per_s"], "step_ms": result["step_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the older tree (kernels, bench, schemas, worker)")
    ap.add_argument("--new", type=Path, default=REPO, help="the newer tree (default: this one)")
    ap.add_argument("--shapes", default="llama-1b")
    ap.add_argument("--arm", default="ftw", help="bench/train_throughput.py's arm: ftw or ftw-fp8")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--arm-timeout", type=int, default=150)
    ap.add_argument("--site", help="a folder of installed wheels to put first on PYTHONPATH")
    args = ap.parse_args()
    trees = {"new": args.new.resolve(), "old": args.old.resolve()}
    print("| shape | pair | order | new tok/s (step ms) | old tok/s (step ms) | new / old |")
    print("|---|---|---|---:|---:|---:|")
    failed = False
    for shape in args.shapes.split(","):
        ratios = []
        for pair in range(args.pairs):
            order = ["new", "old"] if pair % 2 == 0 else ["old", "new"]
            got = {name: run(trees[name], shape, args) for name in order}
            cells = {
                k: f"{v['tokens_per_s']:,} ({v['step_ms']:.1f})" if "error" not in v else f"failed: {v['error']}"
                for k, v in got.items()
            }
            ratio = "-"
            if all("error" not in v for v in got.values()):
                ratios.append(got["new"]["tokens_per_s"] / got["old"]["tokens_per_s"])
                ratio = f"{ratios[-1]:.3f}×"
            else:
                failed = True
            print(
                f"| {shape} | {pair + 1} | {' → '.join(order)} | {cells['new']} | {cells['old']} | {ratio} |",
                flush=True,
            )
        if ratios:
            mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"| {shape} | geometric mean | | | | **{mean:.3f}×** |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

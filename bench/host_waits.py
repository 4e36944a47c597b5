"""Which host calls wait, from a torch.profiler trace (bench/train_throughput.py --profile's .trace.json.gz, or any
Chrome trace torch writes): CUDA's runtime and driver calls by their total time, and the longest of them each with the
innermost torch op it ran inside. A launch costs a few µs; a call that takes milliseconds is waiting, for the device
or for the driver (a synchronisation, a module load, a memory map), and the op around it says which code asked.

    python bench/host_waits.py OUT/prof-llama-1b-gcoff.txt.trace.json.gz [--top 15]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

RUNTIME = ("cuda_runtime", "cuda_driver")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def innermost_op(call: dict, ops: list[dict]) -> str:
    """The shortest cpu_op on the call's thread whose span holds the call."""
    start, end = call["ts"], call["ts"] + call["dur"]
    around = [o for o in ops if o["tid"] == call["tid"] and o["ts"] <= start and o["ts"] + o["dur"] >= end]
    return min(around, key=lambda o: o["dur"])["name"] if around else "-"


def tables(events: list[dict], top: int) -> str:
    calls = [e for e in events if e.get("cat") in RUNTIME]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    by_name: dict[str, list[float]] = defaultdict(list)
    for c in calls:
        by_name[c["name"]].append(c["dur"])
    lines = ["| call | count | total ms | longest µs | median µs |", "|---|---:|---:|---:|---:|"]
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        durs.sort()
        lines.append(f"| {name} | {len(durs)} | {sum(durs) / 1e3:.1f} | {durs[-1]:.0f} | {durs[len(durs) // 2]:.1f} |")
    lines += ["", "| longest calls | µs | inside op |", "|---|---:|---|"]
    for c in sorted(calls, key=lambda c: -c["dur"])[:top]:
        lines.append(f"| {c['name']} | {c['dur']:.0f} | {innermost_op(c, ops)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    for path in a.traces:
        print(f"\n{path.name}\n")
        print(tables(load(path), a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

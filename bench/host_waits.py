"""Which host calls wait, from a torch.profiler trace (bench/train_throughput.py --profile's .trace.json.gz, or any
Chrome trace torch writes): CUDA's runtime and driver calls by their total time, and the longest of them each with the
innermost torch op it ran inside, then the torch ops whose own time (less their children's) is longest, with their
operands' shapes. A launch costs a few µs; a call that takes milliseconds is waiting, for the device or for the driver
(a synchronisation, a module load, a memory map), and the op around it says which code asked. A wait the profiler
traces no CUDA call for (a library's own, inside a GEMM) shows in the last table only.

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


def own_times(ops: list[dict], calls: list[dict]) -> list[tuple[float, dict]]:
    """(µs, op) for each op: its span less its direct children's (ops and CUDA calls) on its thread."""
    own: dict[int, float] = {}
    by_thread: dict[int, list[dict]] = defaultdict(list)
    for e in ops + calls:
        by_thread[e["tid"]].append(e)
    for events in by_thread.values():
        stack: list[dict] = []
        for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                own[id(stack[-1])] -= e["dur"]
            own[id(e)] = own.get(id(e), 0.0) + e["dur"]
            stack.append(e)
    return [(own[id(o)], o) for o in ops]


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
    lines += ["", "| torch op, longest own time | own µs | span µs | operands |", "|---|---:|---:|---|"]
    for own, o in sorted(own_times(ops, calls), key=lambda t: -t[0])[:top]:
        dims = o.get("args", {}).get("Input Dims", "")
        lines.append(f"| {o['name']} | {own:.0f} | {o['dur']:.0f} | {dims} |")
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

"""Where a host-bound step's time goes, sampled from outside the process: bench/gpu_train.py's arms (the real
path and the bare loop) each under py-spy, then their main threads' samples compared function by function.

    HOST_SAMPLES=DIR python bench/gpu_train.py ... --arms bare-fresh,ftw   # each arm's samples to DIR/ARM.txt
    python bench/host_samples.py DIR --steps 70 [--base bare-fresh]        # the tables

The profilers the loops already have do not fit a gap of a few milliseconds a step: torch.profiler and cProfile
pay per op and per Python call, so they inflate the loop that makes more of them. py-spy reads the Python stacks
from another process at a fixed rate without pausing it, the same for every loop; a C++ call counts to the Python
line that made it. (Its --native mode pauses the process for each sample and unwinds through torch's CUDA
libraries: a 1B step took ~4 s under it on an H100, so it is not used.) The sampling still slows the loops a
little: read the figures as shares of a step, compared between arms, not as the arms' speed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

RATE_HZ = 200
# a sample is a step's when its main thread is in one of these (function, file): the train stage's loop, the bare
# loop's step
LOOP_FRAMES = {("Trainer.train", "trainer.py"), ("run_arm.<locals>.step", "train_throughput.py")}


def sampler() -> str | None:
    """py-spy's path when HOST_SAMPLES names a folder (None when it is unset); stops with what to install when it is
    set and py-spy is missing. bench/gpu_train.py asks before building its model and data, not at its first arm."""
    if not os.environ.get("HOST_SAMPLES"):
        return None
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))  # a venv's
    if spy is None:
        raise SystemExit("HOST_SAMPLES is set but py-spy is not on PATH: pip install py-spy (requirements-dev.txt)")
    return spy


def sampled(cmd: list[str], arm: str) -> list[str]:
    """`cmd` under py-spy, its samples to $HOST_SAMPLES/ARM.txt, when HOST_SAMPLES names a folder; else `cmd`."""
    spy = sampler()
    if spy is None:
        return cmd
    folder = os.environ["HOST_SAMPLES"]
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = Path(folder) / f"{arm}.txt"
    record = [spy, "record", "--rate", str(RATE_HZ), "--nonblocking", "--idle", "--threads", "--format", "raw"]
    return [*record, "--output", str(out), "--", *cmd]


def frame_name(frame: str) -> str:
    """`fn (path/to/file.py:123)` -> `fn (to/file.py)`: a function's lines count as one, and site-packages' paths
    and the repository's read alike."""
    name, _, where = frame.rpartition(" (")
    where = re.sub(r":\d+$", "", where.rstrip(")"))
    return f"{name} ({'/'.join(where.split('/')[-2:])})"


def main_thread_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw output (`thread (TID): NAME;frame;frame COUNT` a line): the main thread's stacks, outermost
    frame first, with their sample counts."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        if thread.endswith(": MainThread") and count.isdigit():
            stacks[tuple(frame_name(f) for f in frames)] += int(count)
    return stacks


def is_loop(frame: str) -> bool:
    name, _, where = frame.rpartition(" (")
    return (name, where.rstrip(")").split("/")[-1]) in LOOP_FRAMES


def per_function(stacks: Counter[tuple[str, ...]]) -> tuple[Counter[str], Counter[str], Counter[str], int]:
    """Over the loop's samples: each function's samples with it anywhere on the stack (its total), each
    innermost frame's (its own), each innermost frame's file's, and the loop's samples."""
    total: Counter[str] = Counter()
    own: Counter[str] = Counter()
    where: Counter[str] = Counter()
    n = 0
    for stack, count in stacks.items():
        loop = next((i for i, f in enumerate(stack) if is_loop(f)), None)
        if loop is None:
            continue
        stack = ("the loop", *stack[loop + 1 :])  # the frames inward of the loop's, which differ between loops
        n += count
        for f in set(stack):
            total[f] += count
        own[stack[-1]] += count
        where[stack[-1].rpartition(" (")[2].rstrip(")")] += count
    return total, own, where, n


def table(
    title: str, counts: dict[str, Counter[str]], base: str, ms_per_sample: float, steps: int, rows: int, key="function"
) -> str:
    """Functions (or files: `key`) by their ms a step in each arm, the largest differences from `base` first."""
    arms = list(counts)
    names = set().union(*counts.values())

    def ms(arm: str, name: str) -> float:
        return counts[arm][name] * ms_per_sample / steps

    others = [a for a in arms if a != base]
    order = sorted(names, key=lambda n: -max((abs(ms(a, n) - ms(base, n)) for a in others), default=ms(base, n)))
    head = (
        f"\n{title} (ms a step)\n\n| {key} | " + " | ".join(arms) + " | " + " | ".join(f"{a} − {base}" for a in others)
    )
    lines = [head + " |", "|---|" + "---:|" * (len(arms) + len(others))]
    for name in order[:rows]:
        cells = [f"{ms(a, name):.1f}" for a in arms] + [f"{ms(a, name) - ms(base, name):+.1f}" for a in others]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(folder: Path, steps: int, base: str | None, rows: int, rate: int = RATE_HZ) -> str:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SystemExit(f"no samples in {folder} (run the arms with HOST_SAMPLES={folder})")
    totals, owns, wheres, loop = {}, {}, {}, {}
    for path in files:
        totals[path.stem], owns[path.stem], wheres[path.stem], loop[path.stem] = per_function(main_thread_stacks(path))
    base = base or next(iter(totals))
    if base not in totals:
        raise SystemExit(f"--base {base}: no {base}.txt in {folder} (arms: {', '.join(totals)})")
    ms_per_sample = 1e3 / rate
    head = " · ".join(f"{arm}: {n * ms_per_sample / steps:.1f}" for arm, n in loop.items())
    return (
        f"the loop's samples, ms a step over {steps} steps at {rate} Hz: {head}"
        + table("By total time (the function anywhere on the stack)", totals, base, ms_per_sample, steps, rows)
        + "\n"
        + table("By own time (the innermost frame)", owns, base, ms_per_sample, steps, rows)
        + "\n"
        + table("By the innermost frame's file", wheres, base, ms_per_sample, steps, rows, key="file")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="HOST_SAMPLES's folder: one ARM.txt a sampled arm")
    p.add_argument("--steps", type=int, required=True, help="the steps each arm's loop ran (warmup + timed)")
    p.add_argument("--base", help="the arm the others are compared with (default: the first by name)")
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args()
    print(report(a.folder, a.steps, a.base, a.rows))


if __name__ == "__main__":
    main()

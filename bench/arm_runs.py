"""Each timed arm of the training benches in a process of its own: bench/train_throughput.py in its child mode
(`--child`), which prints one `RESULT {json}` line. Its table, bench/qlora.py and bench/gpu_train_arms.py run their
arms through these."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.host_samples import sampled

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = REPO / "bench" / "train_throughput.py"


def start_child(args: list[str], name: str | None = None) -> subprocess.Popen:
    """`name`: the arm's name in the table, for its host samples (bench/host_samples.py) when HOST_SAMPLES is set."""
    path = os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])  # ftw_kernels
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, str(THROUGHPUT), "--child", *args]
    return subprocess.Popen(
        sampled(cmd, name) if name else cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish_child(proc: subprocess.Popen, args: list[str], timeout: float | None = None) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err = f"{err[-1200:]}\ntimed out after {timeout:g} s (--arm-timeout)"
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return dict(error=(err or out)[-1500:], args=" ".join(args))


def arm_args(arm: str, shape: str, gc: str, mbs: int, seq: int, steps: int, warmup: int) -> list[str]:
    """A child's arguments for one timed arm run; callers append their own switches."""
    sizes = {"--mbs": mbs, "--seq": seq, "--steps": steps, "--warmup": warmup}
    return ["--arm", arm, "--shape", shape, "--gc", gc, *(x for k, v in sizes.items() for x in (k, str(v)))]


def child(args: list[str], timeout: float | None = None, name: str | None = None) -> dict:
    return finish_child(start_child(args, name), args, timeout)

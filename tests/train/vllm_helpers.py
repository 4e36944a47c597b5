"""What the vLLM tests of training share: the engine's environment on 2 shared CPU cores, and the check that
no process of the engine is left."""

from __future__ import annotations

import time
from pathlib import Path


def vllm_env(python: Path) -> dict[str, str]:
    """The train child's environment for vLLM on CPU (start-up time only: eager, small KV cache)."""
    return {
        "FTW_VLLM_PYTHON": str(python),
        "VLLM_EXTRA_ARGS": "--enforce-eager --max-num-seqs 8",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "FTW_VLLM_START_TIMEOUT_S": "600",
    }


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[2] == str(group) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def engine_gone(pid_file: Path, timeout_s: float = 60.0) -> bool:
    """Whether every process of the engine's group (API server, engine core, workers) has exited. Bounded wait:
    after its parent exits, a process may take a moment to be reaped."""
    group = int(pid_file.read_text())
    deadline = time.monotonic() + timeout_s
    while group_members(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])

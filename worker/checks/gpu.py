"""The GPU probe, the first of the machine checks: which devices this job gets, and are they usable.

CUDA_VISIBLE_DEVICES (indices, GPU-/MIG- UUIDs or prefixes, "" or -1 for none) is matched against
what `nvidia-smi` reports, run as a child with a hard timeout (a hung driver costs seconds, not the
job). The probe fails, with what it found, when a named device does not exist, when no GPU is
visible (unless CPU runs are allowed: see cpu_allowed), when a device has
less free memory than the model's weights need, or when a foreign process is computing on it
(operators who share GPUs on purpose set FTW_ALLOW_SHARED_GPU=1). No CUDA library is loaded here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict

from worker.checks.disk import human
from worker.errors import InfraError
from worker.estimate.devices import CONTEXT_HEADROOM, ComputeProcess, Gpu, GpuProbe
from worker.lifeline import die_with_parent

GPU_QUERY = "index,uuid,name,memory.total,memory.used,memory.free,driver_version,compute_cap"
APP_QUERY = "gpu_uuid,pid,used_memory,process_name"
DEFAULT_TIMEOUT_S = 15.0
# The allocator a stage child runs with unless the operator set PYTORCH_CUDA_ALLOC_CONF (`allocator_conf`). Expandable
# segments keep reserved memory near what is allocated whatever the shapes, but short steps of varying token counts
# (unpacked rows, padding-free) ran 2.0× slower under them than under torch's fixed segments on an H100 (1.25× once
# 100 steps had run; docs/benchmarks.md, "2026-12-07"): growing a segment maps memory, which PyTorch documents as
# partly synchronous with the device. Fixed segments cache the sizes met and reserve more: up to CACHING_HEADROOM ×
# the allocated peak (Llama-3.2-1B's unpacked rows: 16.7 GiB reserved for 11.0, 1.52×, with margin).
EXPANDABLE = "expandable_segments:True"
CACHING = "expandable_segments:False"
CACHING_HEADROOM = 1.6


def parse_visible_devices(value: str | None) -> list[str] | None:
    """None: every device; []: none; else the entries (indices or UUIDs) in order."""
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",")]
    if entries in ([""], ["-1"]) or (entries and entries[0] == "-1"):
        return []
    for e in entries:
        if not (e.isdigit() or e.startswith(("GPU-", "MIG-"))):
            raise InfraError(
                f"CUDA_VISIBLE_DEVICES={value!r}: entry {e!r} is neither a device index nor a GPU-/MIG- UUID",
                "set CUDA_VISIBLE_DEVICES to comma-separated indices (0,1) or UUIDs from `nvidia-smi -L`",
            )
    if len(set(entries)) != len(entries):
        raise InfraError(f"CUDA_VISIBLE_DEVICES={value!r} names a device twice", "list each device once")
    return entries


def run_with_deadline(argv: list[str], timeout_s: float) -> str:
    """stdout of a command that must answer within timeout_s; its whole session is killed otherwise."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent()
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:  # stuck in the driver (D state): leave it, do not hang with it
            pass
        raise InfraError(
            f"{argv[0]} did not answer within {timeout_s:.0f} s: the GPU driver looks hung",
            "this machine's GPU is not usable; the job was not started — resubmit so it lands on another worker",
            details={"command": argv, "timeout_s": timeout_s},
        ) from None
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()[-500:]
        raise InfraError(
            f"{argv[0]} failed (exit {proc.returncode}): {text}",
            "the NVIDIA driver is not usable on this machine; resubmit so the job lands on another worker",
            details={"command": argv, "exit": proc.returncode},
        )
    return out.decode(errors="replace")


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split(",")] for line in text.splitlines() if line.strip()]


def _int(value: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        return 0


def query_devices(binary: str, timeout_s: float) -> tuple[list[Gpu], list[ComputeProcess], str]:
    gpus, driver = [], ""
    for row in _rows(
        run_with_deadline([binary, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"], timeout_s)
    ):
        if len(row) < 6:
            continue
        cap = row[7] if len(row) > 7 and row[7][:1].isdigit() else ""
        gpus.append(Gpu(_int(row[0]), row[1], row[2], _int(row[3]), _int(row[4]), _int(row[5]), cap))
        driver = row[6] if len(row) > 6 else driver
    procs = [
        ComputeProcess(row[0], _int(row[1]), _int(row[2]), row[3] if len(row) > 3 else "")
        for row in _rows(
            run_with_deadline([binary, f"--query-compute-apps={APP_QUERY}", "--format=csv,noheader,nounits"], timeout_s)
        )
        if len(row) >= 3 and row[1].isdigit()
    ]
    return gpus, procs, driver


def select(gpus: list[Gpu], wanted: list[str] | None, visible: str | None) -> list[Gpu]:
    if wanted is None:
        return gpus
    chosen = []
    for entry in wanted:
        if entry.isdigit():
            match = [g for g in gpus if g.index == int(entry)]
        else:
            match = [g for g in gpus if g.uuid.startswith(entry)]
        if len(match) != 1:
            found = "; ".join(f"{g.index}: {g.name} {g.uuid}" for g in gpus) or "none"
            raise InfraError(
                f"CUDA_VISIBLE_DEVICES={visible!r} names device {entry!r}, which this machine does not have "
                f"({len(gpus)} GPU(s) found: {found})",
                "set CUDA_VISIBLE_DEVICES to devices that exist, or leave it unset to use all of them",
                details={"found": [asdict(g) for g in gpus]},
            )
        chosen.append(match[0])
    return chosen


def cpu_allowed(env: Mapping[str, str], job_asks: bool) -> bool:
    """The operator decides: FTW_ALLOW_CPU=1 lets every job run without a GPU, 0 lets none (the
    image's default), unset lets a job ask with allow_cpu: true (local runs and the demo)."""
    operator = (env.get("FTW_ALLOW_CPU") or "").strip().lower()
    if operator in ("1", "true", "yes"):
        return True
    return job_asks and operator not in ("0", "false", "no")


def probe(env: Mapping[str, str], need_bytes: int = 0, allow_cpu: bool = False) -> GpuProbe:
    """What this job will run on; an InfraError in seconds when it cannot run here."""
    start = time.monotonic()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    wanted = parse_visible_devices(visible)
    timeout_s = float(env.get("FTW_GPU_PROBE_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    binary = env.get("FTW_NVIDIA_SMI") or shutil.which("nvidia-smi", path=env.get("PATH"))
    result = GpuProbe(visible=visible)
    if wanted != [] and binary:
        gpus, procs, result.driver = query_devices(binary, timeout_s)
        result.devices = select(gpus, wanted, visible)
        uuids = {g.uuid for g in result.devices}
        result.processes = [p for p in procs if p.gpu_uuid in uuids and p.pid != os.getpid()]
    result.elapsed_s = time.monotonic() - start
    if not result.devices:
        if allow_cpu:
            result.cpu_only = True
            return result
        why = (
            "CUDA_VISIBLE_DEVICES hides every device"
            if wanted == []
            else "nvidia-smi is not installed"
            if not binary
            else "nvidia-smi lists no GPU"
        )
        forbidden = not cpu_allowed(env, job_asks=True)
        raise InfraError(
            f"no GPU available to this job ({why})",
            "run on a GPU worker; this endpoint allows no CPU runs (FTW_ALLOW_CPU=0)"
            if forbidden
            else "run on a GPU worker; for a CPU-only test run set FTW_ALLOW_CPU=1 on the endpoint "
            "or allow_cpu: true in the job",
            details=result.as_dict(),
        )
    shared_ok = (env.get("FTW_ALLOW_SHARED_GPU") or "") in ("1", "true", "yes")
    if result.processes and not shared_ok:
        listed = "; ".join(f"pid {p.pid} {p.name} using {p.used_mib} MiB on {p.gpu_uuid}" for p in result.processes)
        raise InfraError(
            f"another process is computing on this job's GPU(s): {listed}",
            "the worker is not clean (a leftover job?); resubmit so the job lands on another worker, "
            "or set FTW_ALLOW_SHARED_GPU=1 if sharing is intended",
            details=result.as_dict(),
        )
    short = [g for g in result.devices if g.free_mib * (1 << 20) < need_bytes + CONTEXT_HEADROOM]
    if need_bytes and short:
        listed = "; ".join(
            f"GPU {g.index} ({g.name}): {human(g.free_mib << 20)} free of {human(g.total_mib << 20)}" for g in short
        )
        raise InfraError(
            f"not enough GPU memory: the model's weights alone need about {human(need_bytes)} per GPU "
            f"(+1 GiB for CUDA), but {listed}",
            "use a larger GPU or more GPUs with fsdp/deepspeed zero3, or load_in_4bit with adapter: qlora",
            details={**result.as_dict(), "need_bytes": need_bytes},
        )
    return result


def allocator_conf(result: GpuProbe, peak_bytes: int | None, engine_share: float = 0.0) -> str:
    """Fixed segments where the predicted peak, with what they may cache beyond it, fits every probed device's free
    memory less `engine_share` of it (a vLLM engine beside the trainer sizes itself by that share); else, or with no
    prediction, expandable segments, which never hold much more than the run allocates."""
    if peak_bytes is None or not result.devices:
        return EXPANDABLE
    room = min((d.free_mib - engine_share * d.total_mib) * (1 << 20) for d in result.devices)
    return CACHING if peak_bytes * CACHING_HEADROOM + CONTEXT_HEADROOM <= room else EXPANDABLE


def stage_env(
    result: GpuProbe, env: Mapping[str, str], peak_bytes: int | None = None, engine_share: float = 0.0
) -> dict[str, str]:
    """What a training child needs to see exactly the probed devices, with the allocator `allocator_conf` picks for
    the predicted peak (`peak_bytes`) beside a vLLM engine's `engine_share` of the GPU, unless the operator set one
    (torch's unified PYTORCH_ALLOC_CONF too: copied, so that whichever name a torch reads first holds it)."""
    operator = env.get("PYTORCH_CUDA_ALLOC_CONF") or env.get("PYTORCH_ALLOC_CONF")
    extra = {"PYTORCH_CUDA_ALLOC_CONF": operator or allocator_conf(result, peak_bytes, engine_share)}
    if result.cpu_only:
        extra["CUDA_VISIBLE_DEVICES"] = ""
    elif result.visible is not None:
        extra["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid for g in result.devices)
    return extra

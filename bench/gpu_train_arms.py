"""The arms of bench/gpu_train.py (its docstring says what each measures): the plain transformers+peft loop,
`python -m worker.train` as `ftw train` runs it, and train_throughput's bare loop with the same kernels."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.host_samples import sampled
from bench.models import (
    LORA_16,
    LORA_16_MOE,
    PROFILED_STEPS,
    SHAPES,
    TARGETS,
    TIMED_RUN,
    device,
    seconds_per_step,
    seconds_per_step_by_timestamps,
)

REPO = Path(__file__).resolve().parents[1]


def hf_arm(model_dir: Path, cache: Path, warmup: int, steps: int, mbs: int, seq: int) -> dict:
    """The plain loop, in its own process (see main)."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dev = device()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", use_cache=False, device_map={"": dev}
    )
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=dev.type == "cuda")
    rows = load_from_disk(str(cache / "train")).with_format("torch")
    batches = []
    for i in range(warmup + steps):
        batch = {
            k: rows[i % len(rows)][k].long().view(mbs, seq).to(dev) for k in ("input_ids", "labels", "position_ids")
        }
        assert bool((batch["position_ids"][:, 0] == 0).all()), "every row of seq tokens must start a sample"
        batch["labels"][batch["position_ids"] == 0] = -100
        batches.append(batch)
    tokens, t0 = 0, None
    for i, batch in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += batch["input_ids"].numel()
    torch.cuda.synchronize() if dev.type == "cuda" else None
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {
        "tokens_per_s": round(tokens / dt),
        "ms_per_step": round(dt / steps * 1e3, 1),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "final_loss": round(float(loss), 4),
    }


def ftw_arm(arm: str, model_dir: Path, cache: Path, work: Path, a: argparse.Namespace) -> dict:
    """`arm` NAME or NAME~VARIANTS: the train stage with parts of its step taken out (bench/train_variants.py)."""
    from schemas.config import TrainingConfig

    name, _, variants = arm.partition("~")
    run_dir = work / arm
    shutil.rmtree(run_dir, ignore_errors=True)  # a warm machine keeps the last call's events
    run_dir.mkdir(parents=True)
    warmup, steps = a.warmup, a.steps
    profiled = PROFILED_STEPS if a.profile else 0  # every arm here is ftw's real path
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": "bench.jsonl", "type": "completion"}],
        **(LORA_16_MOE if SHAPES[a.shape]["model_type"].endswith("_moe") else LORA_16),
        "merge_lora": name == "ftw" and a.merge,
        # the profiled window starts one step after the last timed one: that step's event is not delayed by it
        "sequence_len": a.seq,
        "sample_packing": not a.unpacked,
        "micro_batch_size": a.mbs,
        "gradient_accumulation_steps": a.accum,
        "max_steps": warmup + steps + (profiled + 1 if profiled else 0),
        "learning_rate": 1e-4,
        "optimizer": "adamw_torch_fused",
        **TIMED_RUN,
    }
    if name == "ftw-nokernels":
        cfg["use_kernels"] = False
    if name.startswith("qlora"):
        cfg.update(adapter="qlora", load_in_4bit=True)
    if name.startswith(("ftw-fp8", "qlora-fp8")):
        cfg["fp8_base_weights"] = True
    cfg.update(a.config)
    if name.endswith("+gc"):
        cfg["gradient_checkpointing"] = True
    if name.endswith("+offload"):
        cfg["gradient_checkpointing"] = "offload"
    (run_dir / "config.json").write_text(TrainingConfig.model_validate(cfg).model_dump_json())
    path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "FTW_EVENTS": str(run_dir / "events.jsonl"),
        "FTW_ERROR_FILE": str(run_dir / "error.json"),
        "PYTHONPATH": path,
    }
    if name == "ftw-nographs":
        env["FTW_MOE_GRAPHS"] = "0"
    if name == "ftw-unjoined":
        from worker.train.batches import JOIN_ENV

        env[JOIN_ENV] = "0"
    if profiled:
        env["FTW_PROFILE_STEPS"] = f"{warmup + steps + 1}:{warmup + steps + 1 + profiled}"
    stage = ["-m", "worker.train"] if not variants else [str(REPO / "bench" / "train_variants.py"), variants]
    stage += [str(run_dir / "config.json"), "--run-dir", str(run_dir), "--data", str(cache)]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            sampled([sys.executable, *stage], arm),
            env=env,
            capture_output=True,
            text=True,
            timeout=a.arm_timeout,
        )
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {a.arm_timeout} s: {(e.stderr or b'')[-800:]!r}", "exit": None}
    wall = time.monotonic() - started
    if proc.returncode != 0:
        return {"error": (proc.stderr or "")[-1500:], "exit": proc.returncode}
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # per-step events only: the closing "done" event also carries the loss, after the outputs are written
    steps_seen = {e["step"]: e for e in events if e.get("stage") == "train" and "loss" in e and "event" not in e}
    summary = json.loads((run_dir / "summary.json").read_text())
    last = warmup + steps
    step_s = seconds_per_step(steps_seen, warmup, last)
    if all("tokens" in steps_seen.get(s, {}) for s in (warmup, last)):  # the window's own tokens (unpacked: each
        per_step = (steps_seen[last]["tokens"] - steps_seen[warmup]["tokens"]) / steps  # step has its own count)
    else:  # a tree before the step events carried them: the run's mean
        per_step = summary["tokens"] / summary["steps"]
    result = {
        "tokens_per_s": round(per_step / step_s),
        "ms_per_step": round(step_s * 1e3, 1),
        # each step's GPU time, and the window timed by its events' timestamps as before 3c5f31c (how far off that was)
        "step_ms_each": [steps_seen.get(s, {}).get("step_ms") for s in range(warmup + 1, last + 1)],
        "step_tokens_each": step_tokens(steps_seen, warmup, last),
        "ms_per_step_by_timestamps": round(seconds_per_step_by_timestamps(steps_seen, warmup, last) * 1e3, 1),
        "peak_memory_gib": summary["peak_memory_gib"],  # the process's, loading included
        "step_peak_memory_gib": summary.get("step_peak_memory_gib"),  # the steps' own (CUDA)
        "final_loss": dict(summary["loss_curve"])[last],
        "kernels": summary["kernels"],
        "child_wall_s": round(wall, 1),
        # the GPU's SM clock over the run and its busy share over the timed steps (nvidia-smi): a slow arm waited on
        # the host or not
        **({"gpu_sm_clock_mhz": summary["gpu_sm_clock_mhz"]} if "gpu_sm_clock_mhz" in summary else {}),
        **timed_busy_share(steps_seen, warmup, last),
    }
    if profiled:
        result.update(profile_figures(run_dir / "profile.txt", profiled))
    merge = [e["ts"] for e in events if e.get("stage") == "merge"]
    done = [e["ts"] for e in events if e.get("event") == "done"]
    if merge and done:
        result["merge_s"] = round(done[-1] - merge[0], 1)
        result["merged_gib"] = round(
            sum(p.stat().st_size for p in (run_dir / "merged").glob("*.safetensors")) / 2**30, 2
        )
    return result


def bare_arm(a: argparse.Namespace, replay: bool = True) -> dict:
    """train_throughput's ftw arm (its own child process) in this table's units; `replay` False (arm `bare-fresh`):
    on unpacked rows, every step's lengths met for the first time inside the timed steps, as a real run meets them."""
    from bench import arm_runs

    args = arm_runs.arm_args("ftw", a.shape, "off", a.mbs, a.seq, a.steps, a.warmup)
    if a.full_length:  # the same rows as the real path's cache
        args.append("--full-length")
    if a.prompt_share:
        args += ["--prompt-share", str(a.prompt_share)]
    if a.unpacked:  # every step a new length: its batches once untimed first, unless `replay` is off
        args += ["--unpacked", "--replay"] if replay else ["--unpacked"]
    r = arm_runs.child(args, timeout=a.arm_timeout, name="bare" if replay else "bare-fresh")
    if "tokens_per_s" not in r:
        return {"error": r.get("error") or "no result"}
    return {
        "tokens_per_s": r["tokens_per_s"],  # the real tokens of its timed steps (unpacked: not mbs × seq a step)
        "ms_per_step": r["step_ms"],
        "step_ms_each": r.get("step_ms_each"),  # CUDA events between steps, as the real path's `step_ms`
        "step_tokens_each": r.get("step_tokens_each"),
        **(
            {"gpu_busy_share": r["gpu_busy_share"], "gpu_sm_clock_mhz": r["sm_mhz"]}
            if r.get("gpu_busy_share") is not None
            else {}
        ),
        "peak_memory_gib": r["peak_alloc_gib"],
        "final_loss": r["loss_last"],
        "kernels": r["kernels"],
    }


def step_tokens(steps_seen: dict, warmup: int, last: int) -> list[int] | None:
    """Each timed step's tokens, from the step events' running count (the arms' batches differ: the trainer's plan
    orders the rows its own way)."""
    counts = [steps_seen.get(s, {}).get("tokens") for s in range(warmup, last + 1)]
    return None if None in counts else [after - before for before, after in zip(counts, counts[1:])]


def timed_busy_share(steps_seen: dict, warmup: int, last: int) -> dict:
    """The GPU's median busy share over the timed steps' events, as the bare loop's sampler spans its timed steps
    alone (the run's summary spans the warmup's compiles too); {} where the events lack it."""
    busy = [steps_seen.get(s, {}).get("gpu_busy_pct") for s in range(warmup + 1, last + 1)]
    known = [b for b in busy if b is not None]
    return {"gpu_busy_share": round(statistics.median(known) / 100, 3)} if known else {}


def cpu_times():
    """The machine's CPU time so far by kind (psutil: user, system, idle, iowait, steal, ... on Linux); None where
    psutil cannot read it."""
    import psutil

    try:
        return psutil.cpu_times()
    except (OSError, NotImplementedError):
        return None


def host_load(before, after) -> dict:
    """Between two cpu_times: how many CPUs were busy on average, and the share of CPU time the hypervisor gave to
    other guests (steal). A host-bound arm slowed by its neighbours shows steal; one slowed by work of its own machine
    shows busy CPUs."""
    if before is None or after is None:
        return {}
    spent = {kind: getattr(after, kind) - getattr(before, kind) for kind in before._fields}
    total = sum(t for kind, t in spent.items() if kind not in ("guest", "guest_nice"))  # guests' time is in user's
    if total <= 0:
        return {}
    idle = spent["idle"] + spent.get("iowait", 0.0)
    return {
        "cpus_busy": round((total - idle) / total * (os.cpu_count() or 1), 2),
        "cpu_steal_share": round(spent.get("steal", 0.0) / total, 4),
    }


def profile_figures(path: Path, steps: int) -> dict:
    """GPU busy time and host time per step from worker/train/profile.py's table. The host time
    is inflated by the profiler's own per-op cost: read it as an upper bound."""
    if not path.is_file():
        return {"profile": "missing"}
    text = path.read_text()
    walls = json.loads(re.search(r"step wall s: (\[.*?\])", text).group(1))
    out = {"profiled_host_ms_per_step": round(1e3 * sum(walls) / len(walls), 1)}
    gpu = re.search(r"Self CUDA time total: ([\d.]+)(us|ms|s)\n", text)
    if gpu:
        out["gpu_busy_ms_per_step"] = round(
            float(gpu.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[gpu.group(2)] / steps, 1
        )
    return out


def has_cuda_bnb() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None

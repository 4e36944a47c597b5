"""Two GPUs through the job path (issue 18 part 2): `ftw run JOB.json` — the handler's pipeline:
probe, preprocess, torchrun, train, publish — with CUDA_VISIBLE_DEVICES naming one GPU, then two.

    python bench/gpu_multi.py --out OUT_DIR                     # on nvidia-h200-x2 (bench/gpu_multi.sh)
    python bench/gpu_multi.py --out OUT_DIR --dry-run-cpu       # rehearsal on CPU: tiny shape, gloo

Arms, on random-init models of public shapes (bench/models.py's builder; no Hub):
  llama-8b  LoRA r=16 on the seven linear layers, bf16  — one GPU, then 2 × {ddp, fsdp2, zero2, zero3}
  llama-1b  full fine-tuning, bf16                      — one GPU, then 2 × {ddp, fsdp2, zero2, zero3}
Each arm trains the same packed rows (a text dataset in BASE_VOLUME, tokenized by the job's own
preprocess stage). Per arm: tokens/s over the steps after --warmup (from the per-step events),
tokens/s per GPU, scaling efficiency = tokens/s on 2 GPUs / (2 × tokens/s on 1 GPU, same shape, same
call), peak memory per GPU (nvidia-smi sampled every 200 ms; on CPU the rank-0 RSS from summary.json).
Then the kill: a 2-GPU DDP LoRA job saving every --save-steps, one rank SIGKILLed after the first
checkpoint → the job must fail fast with a typed error (seconds from kill to the failure JSON are
reported), and the same job again must resume from that checkpoint and finish.
With --joined, two more 2-GPU DDP arms of the 8B LoRA shape on unpacked samples, 1 × 8 accumulated: a step's samples
joined across its micro-batches (every rank into as many passes as the rank that needs most) against one pass a
micro-batch (FTW_JOIN_STEPS=0), same rows, and their ratio. (A CPU has no varlen attention, hence no padding-free
rows: there the two arms are the same.)
On CPU (`--dry-run-cpu`) the job path has one process (no GPU to count), so the 2-rank arms and the
kill go through `ftw train --nproc 2` (the same torchrun child, gloo) and the typed job error is not
checked; everything else is the same code. On the 2-core development machine each dry-run arm takes ~2 minutes
and the whole rehearsal well over 15. Writes OUT_DIR/gpu_multi.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.models import seconds_per_step  # noqa: E402

STRATEGIES = {
    "ddp": {},
    "fsdp2": {"fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}},
    "zero2": {"deepspeed": "zero2"},
    "zero3": {"deepspeed": "zero3"},
}
ARMS = {"llama-8b": "lora", "llama-1b": "full"}
JOIN_SHAPE = {"sample_packing": False, "micro_batch_size": 1, "gradient_accumulation_steps": 8}  # axolotl's examples'


def dataset(path: Path, rows: int) -> None:
    """Plain-text rows of varied length (a completion dataset), the same for every arm."""
    import random

    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was at by an be this from or have not are".split()
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(200, 1500)))}) + "\n")


def config(model: Path, data: Path, adapter: str, a: argparse.Namespace, **over) -> dict:
    cfg = {
        "base_model": str(model),
        "datasets": [{"path": str(data), "type": "completion"}],
        "sequence_len": a.seq,
        "sample_packing": True,
        "micro_batch_size": a.mbs,
        "gradient_accumulation_steps": 1,
        "max_steps": a.steps,
        "learning_rate": 1e-4 if adapter == "full" else 2e-4,
        "optimizer": "adamw_torch_fused",
        "lr_scheduler": "constant",
        "bf16": "auto",
        "logging_steps": 1,
        "save_strategy": "no",
        "gradient_checkpointing": adapter == "full",
    }
    if adapter == "lora":
        cfg.update(adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True)
    cfg.update(over)
    return cfg


class MemorySampler:
    """Peak memory.used per GPU (MiB) while an arm runs: nvidia-smi every 200 ms."""

    def __init__(self, enabled: bool):
        self.peak: dict[int, int] = {}
        self.proc = None
        if enabled:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            idx, used = (int(x) for x in line.split(","))
            self.peak[idx] = max(self.peak.get(idx, 0), used)

    def stop(self) -> dict[int, int]:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        return dict(self.peak)


def launch(name: str, cfg: dict, gpus: int, work: Path, a: argparse.Namespace, wait: bool = True, env=None):
    """`ftw run` (GPU) or `ftw train --nproc` (CPU rehearsal of 2 ranks), with `env` over this process's; returns
    (Popen, run_dir)."""
    env = {**os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    if a.dry_run_cpu and gpus > 1:
        run_dir = work / "train-runs" / name
        path = work / f"{name}.config.json"
        path.write_text(json.dumps(cfg))
        argv = [sys.executable, "-m", "worker.cli", "train", str(path), "--run-dir", str(run_dir), "--nproc", str(gpus)]
    else:
        run_dir = Path(os.environ["BASE_VOLUME"]) / "runs" / name
        path = work / f"{name}.job.json"
        path.write_text(
            json.dumps({"input": {"run_id": name, "config": cfg}})
        )  # publishes the adapter (LoRA) or the model (full)
        argv = [sys.executable, "-m", "worker.cli", "run", str(path)]
    log = open(work / f"{name}.log", "a")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    if wait:
        proc.stdout_text = proc.communicate(timeout=a.arm_timeout)[0]
    return proc, run_dir


def train_events(run_dir: Path) -> list[dict]:
    out = []
    for path in run_dir.rglob("events.jsonl"):
        out += [e for e in map(json.loads, path.read_text().splitlines()) if e.get("stage") == "train"]
    return sorted(out, key=lambda e: e.get("ts", 0))


def arm(name: str, cfg: dict, gpus: int, work: Path, a: argparse.Namespace, env=None) -> dict:
    sampler = MemorySampler(enabled=not a.dry_run_cpu)
    t = time.monotonic()
    proc, run_dir = launch(name, cfg, gpus, work, a, env=env)
    peak = sampler.stop()
    row = {"arm": name, "gpus": gpus, "rc": proc.returncode, "wall_s": round(time.monotonic() - t, 1)}
    summaries = list(run_dir.rglob("summary.json"))
    if proc.returncode != 0 or not summaries:
        return {**row, "failed": (proc.stdout_text or "").strip().splitlines()[-1:] or f"see {name}.log"}
    summary = json.loads(summaries[0].read_text())
    steps = {e["step"]: e for e in train_events(run_dir) if "loss" in e and "ts" in e}
    tokens_per_step = summary["tokens"] / max(summary["steps"], 1)
    timed = [s for s in sorted(steps) if s >= a.warmup]
    tps = tokens_per_step / seconds_per_step(steps, timed[0], timed[-1]) if len(timed) > 1 else summary["tokens_per_s"]
    return {
        **row,
        "strategy": summary["strategy"],
        "world_size": summary["world_size"],
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_per_gpu": round(tps / summary["world_size"], 1),
        "final_loss": summary["final_loss"],
        "peak_mib_per_gpu": peak or {"rank0_gib": summary["peak_memory_gib"], "kind": summary["peak_memory_kind"]},
    }


def joined_arms(model: Path, data: Path, work: Path, a: argparse.Namespace) -> list[dict]:
    """2 GPUs under DDP, unpacked samples 1 × 8 accumulated: joined steps against one pass a micro-batch."""
    cfg = config(model, data, "lora", a, **JOIN_SHAPE)
    joined = arm("llama-8b-lora-ddp-joined-2gpu", cfg, 2, work, a)
    unjoined = arm("llama-8b-lora-ddp-unjoined-2gpu", cfg, 2, work, a, env={"FTW_JOIN_STEPS": "0"})
    if "tokens_per_s" in joined and "tokens_per_s" in unjoined:
        joined["joined_over_unjoined"] = round(joined["tokens_per_s"] / unjoined["tokens_per_s"], 3)
    return [joined, unjoined]


def kill_one_rank(model: Path, data: Path, work: Path, a: argparse.Namespace) -> dict:
    """SIGKILL rank 1 after the first checkpoint: time to the failure, then the same job resumes."""
    name = "kill-ddp-lora"
    cfg = config(model, data, "lora", a, max_steps=a.kill_steps, save_strategy="steps", save_steps=a.save_steps)
    proc, run_dir = launch(name, cfg, 2, work, a, wait=False)
    deadline = time.monotonic() + a.arm_timeout
    while (
        time.monotonic() < deadline and proc.poll() is None and not list((run_dir / "checkpoints").glob("checkpoint-*"))
    ):
        time.sleep(0.2)
    rank1 = [
        pid
        for pid in _pids()
        if b"RANK=1\0" in _environ(pid)
        and b"worker.train" in _cmdline(pid)
        and b"torch.distributed.run" not in _cmdline(pid)
    ]
    if proc.poll() is not None or not rank1:
        proc.kill()
        return {"failed": f"no checkpoint or no rank-1 process to kill (rc {proc.poll()}); see {name}.log"}
    os.kill(rank1[0], signal.SIGKILL)
    killed = time.monotonic()
    out = proc.communicate(timeout=a.arm_timeout)[0]
    row = {
        "killed_pid": rank1[0],
        "killed_after": sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")),
        "seconds_to_failure": round(time.monotonic() - killed, 1),
        "rc": proc.returncode,
        "failure": _last_json(out),
    }
    again, _ = launch(name, cfg, 2, work, a)
    summaries = list(run_dir.rglob("summary.json"))
    summary = json.loads(summaries[0].read_text()) if summaries else {}
    row.update(resume_rc=again.returncode, resumed_from=summary.get("resumed_from"), resumed_steps=summary.get("steps"))
    return row


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _last_json(text: str) -> dict | None:
    for line in reversed((text or "").strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run-cpu", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument(
        "--kill-steps", type=int, default=150, help="steps of the kill run (killed after its first checkpoint)"
    )
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--arm-timeout", type=float, default=1800)
    p.add_argument(
        "--shapes", default=",".join(ARMS), help="comma-separated; empty for none (e.g. a call that only kills)"
    )
    p.add_argument(
        "--no-kill", action="store_true", help="skip the rank-kill run (one device call may not fit everything)"
    )
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--joined", action="store_true", help="the 8B LoRA shape's joined and unjoined steps under DDP")
    a = p.parse_args()
    from bench.models import build_model

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    volume = Path(os.environ.setdefault("BASE_VOLUME", str(out / "volume")))
    work = out / "work"
    for d in (volume / "data", volume / "models", work):
        d.mkdir(parents=True, exist_ok=True)
    data = volume / "data" / "text.jsonl"
    dataset(data, a.rows)
    results: dict = {"arms": [], "dry_run_cpu": a.dry_run_cpu}
    for shape in filter(None, a.shapes.split(",")):
        adapter = ARMS[shape]
        model = volume / "models" / (shape if not a.dry_run_cpu else f"tiny-{shape}")
        if not (model / "config.json").exists():
            build_model(model, "tiny" if a.dry_run_cpu else shape, a.seq)
        one = arm(f"{shape}-{adapter}-1gpu", config(model, data, adapter, a), 1, work, a)
        results["arms"].append(one)
        for strat in a.strategies.split(","):
            row = arm(
                f"{shape}-{adapter}-{strat}-2gpu", config(model, data, adapter, a, **STRATEGIES[strat]), 2, work, a
            )
            if "tokens_per_s" in row and "tokens_per_s" in one:
                row["scaling_efficiency"] = round(row["tokens_per_s"] / (2 * one["tokens_per_s"]), 3)
            results["arms"].append(row)
        print(json.dumps(results["arms"][-1]), flush=True)
    if a.joined:
        model = volume / "models" / ("tiny-llama-8b" if a.dry_run_cpu else "llama-8b")
        if not (model / "config.json").exists():
            build_model(model, "tiny" if a.dry_run_cpu else "llama-8b", a.seq)
        results["arms"] += joined_arms(model, data, work, a)
        print(json.dumps(results["arms"][-2:]), flush=True)
    model = volume / "models" / ("tiny-llama-1b" if a.dry_run_cpu else "llama-1b")
    if not a.no_kill:
        if not (model / "config.json").exists():
            build_model(model, "tiny" if a.dry_run_cpu else "llama-1b", a.seq)
        results["kill"] = kill_one_rank(model, data, work, a)
    (out / "gpu_multi.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


def table(r: dict) -> str:
    lines = [
        f"{'arm':38} {'gpus':>4} {'strategy':>9} {'tok/s':>10} {'tok/s/GPU':>10} {'scaling':>8}  peak memory per GPU"
    ]
    for row in r["arms"]:
        if "failed" in row:
            lines.append(f"{row['arm']:38} {row['gpus']:>4} FAILED rc={row['rc']}: {row['failed']}")
            continue
        lines.append(
            f"{row['arm']:38} {row['gpus']:>4} {row['strategy']:>9} {row['tokens_per_s']:>10} "
            f"{row['tokens_per_s_per_gpu']:>10} "
            f"{row.get('scaling_efficiency', ''):>8}  {row['peak_mib_per_gpu']}"
            + (f"  joined × unjoined {row['joined_over_unjoined']}" if "joined_over_unjoined" in row else "")
        )
    if "kill" in r:
        lines.append(f"kill of rank 1: {json.dumps(r['kill'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""What the vLLM tests of training share: the engine's environment on 2 shared CPU cores, the check that
no process of the engine is left, and a GRPO job with trl.use_vllm run through `ftw run`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO, VLLM_TEST_KV_CACHE, child_env


def vllm_env(python: Path) -> dict[str, str]:
    """The train child's environment for vLLM on CPU (start-up time only: eager, the tests' small KV cache:
    8 sequences of ~70 tokens need 600)."""
    return {
        "FTW_VLLM_PYTHON": str(python),
        "VLLM_EXTRA_ARGS": f"--enforce-eager --max-num-seqs 8 {VLLM_TEST_KV_CACHE}",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
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


REWARD = """
def length_bonus(prompts, completions, completion_ids, answer, **kwargs):
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    return [len(ids) / 10 for ids in completion_ids]


def broken(prompts, completions, **kwargs):
    raise ValueError("no score for " + repr(completions[0]))
"""


# the training half of every vLLM test job: a small LoRA on q/v of the tiny model, a few logged steps
LORA_RUN: dict[str, Any] = {
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_target_modules": ["q_proj", "v_proj"],
    "sequence_len": 64,
    "micro_batch_size": 2,
    "learning_rate": 1e-3,
    "optimizer": "adamw_torch",
    "logging_steps": 1,
    "seed": 1,
}


def write_job(volume: Path, run_id: str, job: dict[str, Any]) -> Path:
    """The job file `ftw run` reads, in the volume."""
    path = volume / f"{run_id}.json"
    path.write_text(json.dumps(job))
    return path


def grpo_job(
    volume: Path, model: Path, run_id: str, reward: str, steps: int, limits: dict[str, float] | None = None
) -> Path:
    """A GRPO job with trl.use_vllm on the tiny model: the exact-match reward and one of REWARD's functions."""
    (volume / "rl.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i} {i + 1} ->", "answer": f"{i + 2}"}) + "\n" for i in range(16))
    )
    (volume / "myrewards.py").write_text(REWARD)
    job = {
        "input": {
            "run_id": run_id,
            "allow_cpu": True,
            "publish": ["adapter"],
            **({"limits": limits} if limits else {}),
            "config": {
                "base_model": str(model),
                "rl": "grpo",
                "chat_template": "chatml",
                "trl": {
                    "use_vllm": True,
                    "vllm_sync_interval": 2,
                    "num_generations": 2,
                    "max_completion_length": 6,
                    "reward_funcs": ["exact_match", f"myrewards.{reward}"],
                },
                "datasets": [{"path": str(volume / "rl.jsonl"), "type": "prompt_answer"}],
                **LORA_RUN,
                "max_steps": steps,
            },
        }
    }
    return write_job(volume, run_id, job)


def ftw_run(volume: Path, model: Path, job: Path, engine_env: dict[str, str]) -> subprocess.Popen:
    """`ftw run JOB` in the background; `engine_env` says where vLLM is (vllm_env) and how it starts."""
    env = child_env(
        BASE_VOLUME=str(volume),
        FTW_ALLOWED_PATHS=str(model),
        FTW_ALLOW_CPU="1",
        FTW_ALLOW_PLUGINS="1",
        OMP_NUM_THREADS="1",
        FTW_PROGRESS_INTERVAL_S="0",
        **engine_env,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", str(job)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_of(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate(timeout=800)
    assert out.strip(), err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def train_events(run_dir: Path) -> list[dict[str, Any]]:
    """The train stage's events of every attempt (logs/train/attempt-N/events.jsonl), read without walking the rest
    of the run folder, where the engine replaces adapter folders while the run goes on."""
    return [
        json.loads(line)
        for f in sorted((run_dir / "logs" / "train").glob("attempt-*/events.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip() and json.loads(line).get("stage") == "train"
    ]


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (an engine's model folder, unique to one test)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found

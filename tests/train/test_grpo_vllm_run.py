"""GRPO with trl.use_vllm through `ftw run` on the real vLLM (CPU build): completions come from the engine the
train child starts, the adapter synced every vllm_sync_interval steps, a user's reward function (allowed by
the operator) scores them; and the engine never outlives the train child: not when it ends, not when it
fails, not when it is stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.train.vllm_helpers import engine_gone, ftw_run, parent_of, result_of, train_events

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

REWARD = """
def length_bonus(prompts, completions, completion_ids, answer, **kwargs):
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    return [len(ids) / 10 for ids in completion_ids]


def broken(prompts, completions, **kwargs):
    raise ValueError("no score for " + repr(completions[0]))
"""


def grpo_job(volume: Path, model: Path, run_id: str, reward: str, steps: int) -> Path:
    (volume / "rl.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i} {i + 1} ->", "answer": f"{i + 2}"}) + "\n" for i in range(16))
    )
    (volume / "myrewards.py").write_text(REWARD)
    job = {
        "input": {
            "run_id": run_id,
            "allow_cpu": True,
            "publish": ["adapter"],
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
                "adapter": "lora",
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_target_modules": ["q_proj", "v_proj"],
                "sequence_len": 64,
                "micro_batch_size": 2,
                "max_steps": steps,
                "learning_rate": 1e-3,
                "optimizer": "adamw_torch",
                "logging_steps": 1,
                "seed": 1,
            },
        }
    }
    path = volume / f"{run_id}.json"
    path.write_text(json.dumps(job))
    return path


def test_grpo_generates_with_vllm_syncs_the_adapter_and_stops_the_engine(tiny_model_dir, volume):
    proc = ftw_run(volume, tiny_model_dir, grpo_job(volume, tiny_model_dir, "grpo-vllm", "length_bonus", steps=3))
    result = result_of(proc)
    assert proc.returncode == 0 and result["status"] == "completed", result
    assert any(a["kind"] == "adapter" for a in result["artifacts"])
    run_dir = volume / "runs" / "grpo-vllm"
    steps = [e for e in train_events(run_dir) if "reward" in e and "lr" in e]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for e in steps:  # the user's function saw the engine's completions: its reward is their mean length / 10
        assert e["rewards/myrewards.length_bonus"] == pytest.approx(e["completion_length"] / 10, rel=1e-5)
        assert 0 < e["completion_length"] <= 6
    log = (run_dir / "vllm" / "engine.log").read_text()
    assert "policy-0" in log and "policy-2" in log and "policy-1" not in log  # synced at steps 0 and 2
    assert engine_gone(run_dir / "vllm" / "engine.pid")


def test_a_failing_reward_fails_the_job_clearly_and_the_engine_goes_with_it(tiny_model_dir, volume):
    proc = ftw_run(volume, tiny_model_dir, grpo_job(volume, tiny_model_dir, "grpo-vllm-fails", "broken", steps=3))
    result = result_of(proc)
    assert result["status"] == "failed", result
    error = result["error"]
    assert "reward function myrewards.broken raised ValueError: no score for" in error["message"], error
    assert "myrewards.py" in error["hint"]
    assert engine_gone(volume / "runs" / "grpo-vllm-fails" / "vllm" / "engine.pid")


def test_sigterm_to_the_train_child_stops_the_engine(tiny_model_dir, volume):
    proc = ftw_run(
        volume, tiny_model_dir, grpo_job(volume, tiny_model_dir, "grpo-vllm-term", "length_bonus", steps=200)
    )
    run_dir = volume / "runs" / "grpo-vllm-term"
    pid_file = run_dir / "vllm" / "engine.pid"
    deadline = time.monotonic() + 700
    while not any("reward" in e for e in train_events(run_dir)):  # the engine answered: a step is done
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "no training step within the deadline"
        time.sleep(0.2)
    train_child = parent_of(int(pid_file.read_text()))
    os.kill(train_child, signal.SIGTERM)  # what the child of a preempted worker gets
    result_of(proc)
    assert any(e.get("event") == "preempted" for e in train_events(run_dir))
    assert engine_gone(pid_file)

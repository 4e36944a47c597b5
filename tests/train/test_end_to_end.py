"""`ftw train CONFIG` end to end on CPU: preprocess (worker.data) → LoRA training → adapter,
merged model, summary, loss curve; the tiny Llama then answers held-out prompts of the task."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import SUCCESSOR_SCHEDULE, ftw_cli, greedy, successor_task, write_segments

pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]


def test_ftw_train_lora_learns_a_task_it_was_not_shown(task_model_dir, volume, tmp_path):
    import yaml

    train, held = successor_task()
    data = write_segments(volume / "successor.jsonl", train)
    config = {
        "base_model": str(task_model_dir),
        "datasets": [{"path": str(data), "type": "input_output"}],
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_linear": True,
        "merge_lora": True,
        **SUCCESSOR_SCHEDULE,
        "val_set_size": 0.05,
        "evals_per_epoch": 1,
    }
    path = tmp_path / "successor.yml"
    path.write_text(yaml.safe_dump(config))
    run_dir = volume / "runs" / "successor"
    result = ftw_cli(
        ["train", str(path), "--run-dir", str(run_dir)], volume, timeout=480, FTW_ALLOWED_PATHS=str(task_model_dir)
    )
    assert result["run_dir"] == str(run_dir)

    # the run folder of docs/contracts.md
    adapter = run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] > 50 and summary["packed"] is True
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0 and summary["peak_memory_gib"] > 0
    assert summary["loss_curve"][-1][1] < summary["loss_curve"][0][1] and summary["eval_curve"]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) and all(
        (p / "ftw_state.json").is_file() for p in (run_dir / "checkpoints").iterdir()
    )
    # the train child's events, in the run folder's stage logs (the job path's supervisor names the file)
    steps = [json.loads(line) for path in run_dir.glob("logs/train/*/events.jsonl") for line in path.open()]
    step_events = [e for e in steps if e.get("stage") == "train" and "loss" in e and "lr" in e]
    assert step_events and all(
        {"step", "total_steps", "loss", "lr", "grad_norm", "tokens_per_s", "eta_s"} <= set(e) for e in step_events
    )

    # held-out prompts, greedy: base + adapter, and the merged model gives the same answers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(adapter)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(task_model_dir), str(adapter)).eval()
    answers = [greedy(tuned, tok, p) for p, _ in held[:100]]
    exact = sum(a == want for a, (_, want) in zip(answers, held[:100])) / 100
    assert exact >= 0.9, list(zip(answers[:5], held[:5]))
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    assert [greedy(merged, tok, p) for p, _ in held[:20]] == answers[:20]

"""DPO through `ftw run` end to end on CPU: a synthetic preference task (the successor answer preferred
over the predecessor one), preprocess → DPO with LoRA → adapter published to the local store; the
published adapter then prefers the right answer on held-out prompts it never saw."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import run_events, run_job, successor_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def predecessor(answer: str) -> str:
    return " " + " ".join(str((int(d) - 2) % 10) for d in answer.split())


def chat_ids(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """The conversation as the chatml template renders it, and where the answer starts."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    p = tok(head, add_special_tokens=False)["input_ids"]
    a = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p + a, len(p)


def answer_logp(model, ids: list[int], start: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[start - 1 :].sum())


def preference_accuracy(policy, reference, tok, pairs) -> float:
    """Share of pairs whose implicit DPO reward margin is positive (policy vs reference log-ratios)."""
    right = 0
    for prompt, good, bad in pairs:
        (gi, gs), (bi, bs) = chat_ids(tok, prompt, good), chat_ids(tok, prompt, bad)
        margin = (answer_logp(policy, gi, gs) - answer_logp(reference, gi, gs)) - (
            answer_logp(policy, bi, bs) - answer_logp(reference, bi, bs)
        )
        right += margin > 0
    return right / len(pairs)


def test_dpo_through_ftw_run_learns_held_out_preferences(task_model_dir, volume, tmp_path):
    train, held = successor_task()
    rows = [{"prompt": p, "chosen": a, "rejected": predecessor(a)} for p, a in train[:480]]
    (volume / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {
        "input": {
            "run_id": "dpo-successor",
            "allow_cpu": True,
            "publish": ["adapter"],
            "config": {
                "base_model": str(task_model_dir),
                "rl": "dpo",
                "rl_beta": 0.1,
                "datasets": [{"path": str(volume / "prefs.jsonl"), "type": "chatml.prompt_pairs"}],
                "adapter": "lora",
                "lora_r": 16,
                "lora_alpha": 32,
                "lora_target_linear": True,
                "sequence_len": 32,
                "micro_batch_size": 8,
                "num_epochs": 2,
                "learning_rate": 3e-3,
                "optimizer": "adamw_torch",
                "lr_scheduler": "cosine",
                "warmup_steps": 5,
                "val_set_size": 0.1,
                "evals_per_epoch": 1,
                "logging_steps": 5,
                "seed": 1,
            },
        }
    }
    result = run_job(job, tmp_path, volume, timeout=560, FTW_ALLOWED_PATHS=str(task_model_dir))
    assert result["status"] == "completed", result

    # published like any adapter
    adapter = next(a for a in result["artifacts"] if a["kind"] == "adapter")
    folder = adapter["uri"].removeprefix("file://")
    assert (volume / "store").exists() and folder.startswith(str(volume / "store"))
    events = run_events(volume / "runs" / "dpo-successor")
    train_steps = [e for e in events if e.get("stage") == "train" and "loss" in e and "lr" in e]
    evals = [e for e in events if e.get("stage") == "eval"]
    assert train_steps and {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(
        train_steps[-1]
    )
    assert evals and evals[-1]["eval_rewards/accuracies"] >= 0.9, evals

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(task_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(task_model_dir).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(task_model_dir), folder).eval()
    pairs = [(p, a, predecessor(a)) for p, a in held[:100]]
    before = preference_accuracy(reference, reference, tok, pairs[:10])
    assert before == 0.0  # identical models: no margin at all, the chance baseline
    assert preference_accuracy(policy, reference, tok, pairs) >= 0.9

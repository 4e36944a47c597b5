"""Structured EBFT's reward path on a tiny model: with transformers' generate (the default backend) one
step scores, backpropagates and logs; with a generation backend swapped in that returns the ground
truth itself, every completion's features equal the ground truth's (alignment 2, CFM 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from schemas.config import TrainingConfig
from worker.train.ebft_structured import StructuredEbftObjective, right_padded
from worker.train.grpo import Rollout
from worker.train.sampling import Sampling


def objective(model_dir: Path, **ebft: Any) -> tuple[StructuredEbftObjective, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, target_modules="all-linear")
    )
    model.train()
    cfg = TrainingConfig(
        base_model=str(model_dir),
        learning_rate=1e-3,
        rl="ebft",
        adapter="lora",
        datasets=[{"path": "x.jsonl", "type": "ebft_opencode.transform"}],
        trl={"num_generations": 3, "max_completion_length": 6, "beta": 0.04},
        ebft=ebft,
    )
    return StructuredEbftObjective(cfg, model, tok), tok


def batch(tok: Any) -> dict[str, torch.Tensor]:
    rows = [("1 2 3 ->", " 2 3 4"), ("5 ->", " 6")]
    pairs = [(tok(p, add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids) for p, a in rows]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((2, width), tok.pad_token_id)
    labels = torch.full((2, width), -100)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_right_padded_undoes_the_left_padding():
    rollout = Rollout(
        input_ids=torch.tensor([[0, 7, 8, 9, 0], [5, 6, 7, 3, 4]]),
        attention_mask=torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        completion_mask=torch.tensor([[1, 0], [1, 1]]),
        prompt_width=3,
    )
    ids, mask, completion = right_padded(rollout, pad_id=0)
    assert ids.tolist() == [[7, 8, 9, 0, 0], [5, 6, 7, 3, 4]]
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert completion.long().tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]


def test_one_step_with_transformers_generate(task_model_dir):
    obj, tok = objective(task_model_dir, use_whitening=True, ce_coef=0.1, embed_method="completion_mean")
    loss, sums = obj.loss(obj.model, batch(tok), torch.tensor(2.0))
    loss.backward()
    metrics = obj.metrics(sums.tolist(), 2)
    assert torch.isfinite(loss) and 0 < metrics["completion_length"] <= 6 and metrics["ebft/ce_loss"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.model.parameters() if p.requires_grad)


def test_a_swapped_generation_backend_returning_the_ground_truth_matches_it_exactly(task_model_dir):
    obj, tok = objective(task_model_dir, embed_method="last_token")
    data = batch(tok)
    trained = data["labels"] != -100

    answers = [data["input_ids"][i][trained[i]].tolist() for i in range(data["input_ids"].shape[0])]

    class GroundTruthGenerator:
        """A generation backend that answers every prompt with its ground truth, `n` times."""

        name = "ground-truth"

        def sync(self, step: int, force: bool = False) -> None:
            pass

        def completions(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
            assert len(prompts) == len(answers)
            return [a for a in answers for _ in range(sampling.n)]

        def close(self) -> None:
            pass

    obj.generator = GroundTruthGenerator()
    _, sums = obj.loss(obj.model, data, torch.tensor(2.0))
    metrics = obj.metrics(sums.tolist(), 2)
    assert abs(metrics["ebft/alignment"] - 2.0) < 1e-4 and metrics["ebft/cfm_loss"] < 1e-6, metrics

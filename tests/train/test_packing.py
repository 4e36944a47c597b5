"""Packed rows reach attention as separate samples: the loss of a packed row equals the loss of
its samples run one by one (sdpa and eager), and no sample learns from its neighbour's tokens."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import pack
from worker.train.batches import collate, target_tokens


def summed_loss(model, batch) -> float:
    """Sum of per-token cross-entropy (num_items_in_batch=1 turns the mean into a sum)."""
    with torch.no_grad():
        return float(model(**batch, num_items_in_batch=torch.tensor(1.0)).loss)


@pytest.mark.parametrize(
    "attn, model_dir", [("sdpa", "task_model_dir"), ("eager", "task_model_dir"), ("sdpa", "task_moe_model_dir")]
)
def test_packed_row_loss_equals_samples_one_by_one(request, task_rows, attn, model_dir):
    """(flex_attention passes too, but compiles for 4 min on CPU.) The MoE model: Qwen3-MoE."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model_dir = request.getfixturevalue(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation=attn, use_cache=False
    ).eval()  # a KV cache turns packing detection off
    train, _, _ = task_rows
    # train on inputs too, so the first tokens of every sample would be targets if attention leaked
    samples = [{**r, "labels": list(r["input_ids"])} for r in train[:5]]
    (packed,) = pack(samples, capacity=1000)
    assert packed["position_ids"].count(0) == 5

    batch = collate([packed], pad_id=0, packed=True)
    assert "attention_mask" not in batch
    one_by_one = [collate([s], pad_id=0, packed=False) for s in samples]
    assert target_tokens(batch) == sum(target_tokens(b) for b in one_by_one)

    packed_sum = summed_loss(model, batch)
    separate_sum = sum(summed_loss(model, b) for b in one_by_one)
    assert packed_sum == pytest.approx(separate_sum, rel=1e-5)

    # the control: the same tokens as one long sequence (no position restarts) attend across samples
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    assert abs(summed_loss(model, leaky) - separate_sum) > 1e-3 * separate_sum


def test_first_token_of_each_sample_is_never_a_target():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]},
        {"input_ids": [8, 9], "labels": [8, 9], "position_ids": [0, 1]},
    ]
    (packed,) = pack(rows, capacity=10)
    batch = collate([packed], pad_id=0, packed=True)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_unpacked_rows_are_right_padded_with_a_mask():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
        {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 1]},
    ]
    batch = collate(rows, pad_id=3, packed=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]

"""Padding-free batches: an unpacked supervised run with the varlen attention joins each micro-batch's samples end to
end into one packed row, so no layer computes a padding token, and trains as the padded batches train (the same
losses, eval losses and adapter); the runs whose rows must keep their layout (packed data, the other objectives,
without the varlen kernel, pad_to_sequence_len) stay padded."""

from __future__ import annotations

import pytest
import torch

from schemas.config import TrainingConfig
from tests.train.helpers import (
    adapter_tensors,
    base_config,
    run_inprocess,
    write_cache,
)
from tests.train.test_step_batches import capture_training_inputs
from tests.train.test_target_rows import curve
from worker.train.batches import IGNORE, collate, padding_free, real_tokens, target_tokens

KERNELS = ["rmsnorm", "varlen_attention", "fused_linear_cross_entropy"]


def test_a_flattened_micro_batch_is_its_samples_end_to_end(uneven_rows):
    rows = uneven_rows[:4]
    padded, flat = collate(rows, 0, packed=False), collate(rows, 0, packed=False, flatten=True)
    lengths = [len(r["input_ids"]) for r in rows]
    assert padded["input_ids"].shape == (4, max(lengths)) and len(set(lengths)) > 1  # rows of several lengths
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    assert flat["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]
    assert flat["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(4)]
    assert all(flat["labels"][0, s] == IGNORE for s in starts)  # no sample learns its predecessor's last token
    assert target_tokens(flat) == target_tokens(padded) and real_tokens(flat) == real_tokens(padded) == sum(lengths)


@pytest.mark.parametrize(
    "packed, rl, kernels, pad_to, flattened",
    [
        (False, None, KERNELS, False, True),
        (True, None, KERNELS, False, False),  # packing's bins are rows of their own
        (False, "grpo", KERNELS, False, False),  # GRPO's left-padded prompts
        (False, "dpo", KERNELS, False, False),  # the DPO family's chosen and rejected rows
        (False, None, ["rmsnorm"], False, False),  # transformers' mask for a joined row costs (Σ n)²
        (False, None, KERNELS, True, False),  # pad_to_sequence_len asks for padded rows
    ],
)
def test_which_runs_are_padding_free(packed, rl, kernels, pad_to, flattened):
    cfg = TrainingConfig(base_model="m", learning_rate=1e-4, sample_packing=packed, pad_to_sequence_len=pad_to, rl=rl)
    assert padding_free(cfg, packed, kernels) is flattened


def _train(model_dir, cache, run_dir, monkeypatch, flatten: bool) -> tuple[list, list[float], list[float], list]:
    """(each training forward's inputs, each step's loss, the eval losses, the eval batches) of a 3-step CPU run of
    unpacked rows, flattened or not."""
    import worker.train.evaluation as evaluation
    import worker.train.trainer as trainer

    # the CPU has no varlen kernel: transformers' block mask for packed position ids splits the joined row instead
    monkeypatch.setattr(trainer, "padding_free", lambda *args: flatten)
    monkeypatch.setattr(trainer, "join_budget", lambda *args: None)  # each micro-batch its own row (test_joined_steps)
    seen = capture_training_inputs(monkeypatch)
    evaluated: list = []
    collate_eval = evaluation.collate
    monkeypatch.setattr(evaluation, "collate", lambda *a, **k: evaluated.append(collate_eval(*a, **k)) or evaluated[-1])
    # SGD: its update is the grad's, so the adapters compare as the grads do; Adam's divides each by its own size,
    # and a grad that cancels to near zero (rounded differently in a padded and a joined row) moves by ~lr anywhere
    cfg = base_config(
        model_dir, max_steps=3, micro_batch_size=4, gradient_accumulation_steps=2, save_strategy="no",
        optimizer="sgd", learning_rate=1e-2,
    )  # fmt: skip
    assert run_inprocess({**cfg, "eval_steps": 2}, run_dir, cache) == 0
    monkeypatch.undo()
    return seen, curve(run_dir, "loss_curve"), curve(run_dir, "eval_curve"), evaluated


def test_a_padding_free_run_trains_as_the_padded_one(task_model_dir, uneven_rows, tmp_path, monkeypatch):
    cache = write_cache(tmp_path / "cache", uneven_rows[:48], uneven_rows[48:], packed=False)
    flat_inputs, flat_losses, flat_evals, flat_evals_in = _train(
        task_model_dir, cache, tmp_path / "flat", monkeypatch, flatten=True
    )
    padded_inputs, padded_losses, padded_evals, padded_evals_in = _train(
        task_model_dir, cache, tmp_path / "padded", monkeypatch, flatten=False
    )
    assert len(flat_inputs) == len(padded_inputs) == 6  # 3 steps × 2 micro-batches
    for flat, padded in zip(flat_inputs, padded_inputs):
        assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
        assert flat["input_ids"].numel() == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()
    assert len(flat_losses) == 3 and flat_losses == pytest.approx(padded_losses, rel=1e-5)
    # the eval split's batches joined the same way, in order, up to the largest batch that ran, with the same loss
    flat_ids = [b["input_ids"] for b in flat_evals_in]
    padded_real = [b["input_ids"][b["attention_mask"].bool()] for b in padded_evals_in]  # each batch's samples
    assert all(ids.shape[0] == 1 for ids in flat_ids) and all(b["input_ids"].shape[0] > 1 for b in padded_evals_in)
    assert torch.equal(torch.cat([ids.flatten() for ids in flat_ids]), torch.cat(padded_real))
    assert len(flat_ids) <= len(padded_real)
    assert max(ids.numel() for ids in flat_ids) <= max(real.numel() for real in padded_real)
    assert len(flat_evals) >= 1 and flat_evals == pytest.approx(padded_evals, rel=1e-5)
    flat_adapter, padded_adapter = (adapter_tensors(tmp_path / d / "adapter") for d in ("flat", "padded"))
    for name, tensor in flat_adapter.items():
        torch.testing.assert_close(tensor, padded_adapter[name], rtol=1e-5, atol=1e-7)

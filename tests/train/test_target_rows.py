"""The trainer's supervised steps hand the fused loss head the rows that carry a loss, listed as each batch is read
from the CPU batch: on prompt-masked data (the successor task's prompts are -100) the head computes logits for the
step's target tokens only, and training gives the losses and adapter that all rows give."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import adapter_tensors, base_config, pack, run_inprocess, write_cache
from worker.train.batches import BatchPlan, StepBatches, target_tokens


def test_each_micro_batch_lists_its_target_rows(task_rows):
    from datasets import Dataset

    from ftw_kernels.cross_entropy import target_rows

    train, _, _ = task_rows
    ds = Dataset.from_list(train[:8])
    plan = BatchPlan(8, 4, 1, 1, seed=0)
    batches = StepBatches(ds, plan, 0, 0, False, range(2), torch.device("cpu"), target_rows=True)
    try:
        steps = [batches.get(0), batches.get(1)]
    finally:
        batches.close()
    for step in steps:
        for micro in step.micro:
            assert torch.equal(micro["target_rows"], target_rows(micro["labels"]))
            assert 0 < micro["target_rows"].numel() == target_tokens(micro) < micro["input_ids"].numel()


def test_a_micro_batch_where_nearly_every_row_has_a_target_keeps_them_all():
    """Full-length rows of one sample each: only a row's last token has no target, and the gather would cost more
    than the rows it skips."""
    from worker.train.batches import collate, host_inputs

    ids = list(range(1, 201))
    full = collate([{"input_ids": ids, "labels": ids, "position_ids": list(range(200))}] * 2, 0, packed=False)
    assert "target_rows" not in host_inputs(full, varlen=False, target_rows=True)
    prompted = collate(
        [{"input_ids": ids, "labels": [-100] * 20 + ids[20:], "position_ids": list(range(200))}], 0, False
    )
    assert host_inputs(prompted, varlen=False, target_rows=True)["target_rows"].numel() == 180


def _train(task_model_dir, cache, run_dir, monkeypatch, gathered: bool) -> tuple[list[int], list[float]]:
    """(the rows of each loss-head chunk, each step's loss) of a 3-step CPU run with the kernels on."""
    from ftw_kernels import cross_entropy
    from worker.train.objective import SupervisedObjective

    if not gathered:  # every row of the batch to the head, as before the target rows
        monkeypatch.setattr(SupervisedObjective, "__init__", _all_rows_init(SupervisedObjective.__init__))
    rows: list[int] = []
    chunk = cross_entropy._chunk_dlogits
    monkeypatch.setattr(cross_entropy, "_chunk_dlogits", lambda h, *a: rows.append(h.shape[0]) or chunk(h, *a))
    cfg = base_config(task_model_dir, max_steps=3, micro_batch_size=1, gradient_accumulation_steps=2, bf16=False)
    assert run_inprocess({**cfg, "use_kernels": True, "save_strategy": "no", "tf32": False}, run_dir, cache) == 0
    monkeypatch.undo()
    return rows, curve(run_dir, "loss_curve")


def curve(run_dir, key: str) -> list[float]:
    """A run's losses by step from its summary.json (`loss_curve`, `eval_curve`)."""
    return [loss for _, loss in json.loads((run_dir / "summary.json").read_text())[key]]


def _all_rows_init(init):
    def without_rows(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.target_rows = False

    return without_rows


def test_training_gives_the_same_run_with_the_head_over_target_rows(task_model_dir, task_rows, tmp_path, monkeypatch):
    train, _, _ = task_rows
    packed = pack(train[:48], 64)
    cache = write_cache(tmp_path / "cache", packed, packed=True)
    rows, losses = _train(task_model_dir, cache, tmp_path / "gathered", monkeypatch, gathered=True)
    all_rows, all_losses = _train(task_model_dir, cache, tmp_path / "all", monkeypatch, gathered=False)
    assert len(rows) == len(all_rows) == 6  # 3 steps × 2 micro-batches, one chunk each
    assert all(n == 64 for n in all_rows)
    targets = [target_tokens({"labels": torch.tensor([r["labels"]])}) for r in packed]
    assert set(rows) <= set(targets) and sum(rows) <= sum(all_rows) // 2  # half the tokens are prompts
    assert len(losses) == 3 and losses == pytest.approx(all_losses, rel=1e-5)
    gathered, everything = (adapter_tensors(tmp_path / d / "adapter") for d in ("gathered", "all"))
    for name, tensor in gathered.items():
        torch.testing.assert_close(tensor, everything[name], rtol=1e-4, atol=1e-6)


def test_evaluation_through_the_fused_loss_reads_as_without_the_kernels(task_model_dir, task_rows, tmp_path):
    """The eval split's loss per target token, from an eval forward through the fused loss (no logits), is the one
    transformers' loss gives: the same sum over the tokens, divided by the same count."""
    train, held, _ = task_rows
    cache = write_cache(tmp_path / "cache", train[:16], held[:12])
    cfg = base_config(task_model_dir, max_steps=3, eval_steps=2, save_strategy="no")
    losses = {}
    for kernels in (True, False):
        run_dir = tmp_path / f"kernels-{kernels}"
        assert run_inprocess({**cfg, "use_kernels": kernels}, run_dir, cache) == 0
        losses[kernels] = curve(run_dir, "eval_curve")
    assert len(losses[True]) >= 1 and losses[True] == pytest.approx(losses[False], rel=1e-4)

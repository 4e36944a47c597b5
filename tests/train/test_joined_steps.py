"""A padding-free step's samples joined across its micro-batches (worker/train/batches.py `joined`): with gradient
accumulation in one process, the step's samples run in as few rows as the run's largest micro-batch holds. The loss
sums each target token's loss over the step's count, so the joined rows give the same losses and adapter as the
micro-batches, in fewer passes, none larger than a micro-batch the run trains anyway (its peak memory)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from schemas.config import TrainingConfig
from tests.train.helpers import adapter_tensors, base_config, run_inprocess, write_cache
from tests.train.test_step_batches import capture_training_inputs
from tests.train.test_target_rows import curve
from worker.train.batches import (
    FLATTENED,
    BatchPlan,
    Rows,
    join_budget,
    joined,
    largest_micro_tokens,
    layout_name,
    ranks_passes,
    read_step,
    runs_within,
    split_runs,
)


def rows_of(lengths: list[int]) -> list[dict]:
    return [{"input_ids": [i] * n} for i, n in enumerate(lengths)]


def fewest_runs(lengths: list[int], budget: int) -> int:
    """Brute force: the fewest consecutive runs of `lengths` within `budget` each."""
    best = [0] + [len(lengths) + 1] * len(lengths)
    for end in range(1, len(lengths) + 1):
        for start in range(end):
            if sum(lengths[start:end]) <= budget:
                best[end] = min(best[end], best[start] + 1)
    return best[-1]


@pytest.mark.parametrize("seed", range(40))
def test_joined_runs_keep_the_order_stay_within_the_budget_and_are_fewest(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
    budget = max(lengths) + rng.randint(0, 60)
    runs = joined(rows_of(lengths), budget)
    assert [row for run in runs for row in run] == rows_of(lengths)  # every sample once, in its order, whole
    assert all(sum(len(r["input_ids"]) for r in run) <= budget for run in runs)
    assert len(runs) == fewest_runs(lengths, budget)


@pytest.mark.parametrize("rows, mbs, accum, steps", [(10, 2, 3, 7), (37, 4, 2, 5), (5, 1, 4, 9), (64, 3, 3, 2)])
def test_the_largest_micro_batch_is_the_plans_over_every_epoch_of_the_run(rows, mbs, accum, steps):
    lengths = np.random.default_rng(rows).integers(1, 500, rows)
    plan = BatchPlan(rows, mbs, accum, 1, seed=3)
    every = [sum(lengths[i] for i in micro) for step in range(steps) for micro in plan.micro_batches(step, 0)]
    assert largest_micro_tokens(lengths, plan, steps) == max(every)


@pytest.mark.parametrize(
    "config, processes, joins",
    [
        ({}, 1, True),
        ({"sample_packing": True}, 1, False),  # packed or padded rows
        ({"gradient_accumulation_steps": 1}, 1, False),  # one micro-batch a step
        ({}, 2, True),  # two ranks under DDP: as many passes on each (batches.ranks_passes)
        ({"fsdp_config": {"fsdp_version": 2}}, 2, True),
        ({"output_router_logits": True}, 1, False),  # its coefficient is shared per micro-batch
        ({"deepspeed": "zero2"}, 1, True),  # one process trains without DeepSpeed's engine (distributed.strategy)
        ({"deepspeed": "zero2"}, 2, False),  # the engine counts a step's micro-batches itself
        ({"deepspeed": "zero2", "deepspeed_as_fsdp": True}, 2, True),  # FSDP2 with ZeRO's sharding
    ],
)
def test_only_an_accumulating_run_without_the_router_loss_or_deepspeeds_engine_joins(config, processes, joins):
    base = dict(base_model="m", learning_rate=1e-4, sample_packing=False, gradient_accumulation_steps=3)
    assert TrainingConfig(**{**base, **config}).joins_steps(processes) is joins


def test_the_budget_is_the_runs_largest_micro_batch_unless_asked_not_to(monkeypatch):
    from datasets import Dataset

    from worker.data.rows import lengths as row_tokens

    ds = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 9, 4, 2, 7, 5)]})
    accumulating = BatchPlan(6, 1, 3, 1, seed=0)
    sizes = row_tokens(ds.with_format("arrow")[:])
    assert join_budget(sizes, accumulating, 4, joins=True) == 9  # the longest sample, at one sample a micro-batch
    assert join_budget(sizes, accumulating, 4, joins=False) is None
    monkeypatch.setenv("FTW_JOIN_STEPS", "0")  # bench/gpu_train.py's ftw-unjoined arm
    assert join_budget(sizes, accumulating, 4, joins=True) is None
    # the run's log says which layout it trains
    assert layout_name(False, True, 2048) == "unpacked, a step's samples joined into rows of at most 2,048 tokens"
    assert layout_name(False, True, None) == "unpacked, each micro-batch one row"
    assert layout_name(True, False, None) == "packed" and layout_name(False, False, None) == "unpacked"


def _train(model_dir, cache, run_dir, monkeypatch, join: bool) -> tuple[list, list[float], list, list[float]]:
    """(each training forward's inputs, each step's loss, each eval forward's input_ids, the eval losses) of a 3-step
    CPU run, mbs 1 × 4 accumulated, evaluated after steps 2 and 3; `join`: a step's samples joined, and the eval's."""
    import worker.train.evaluation as evaluation
    import worker.train.trainer as trainer

    # the CPU has no varlen kernel: transformers' block mask for packed position ids splits the joined row instead
    monkeypatch.setattr(trainer, "padding_free", lambda *args: True)
    if not join:
        monkeypatch.setattr(trainer, "join_budget", lambda *args: None)
        monkeypatch.setattr(evaluation, "joined_chunks", lambda sizes, chunks, join_tokens: chunks)
    seen = capture_training_inputs(monkeypatch)
    evaluated: list = []
    collate_eval = evaluation.collate
    monkeypatch.setattr(evaluation, "collate", lambda *a, **k: evaluated.append(collate_eval(*a, **k)) or evaluated[-1])
    # SGD: the adapters compare as the grads do (see test_padding_free)
    cfg = base_config(
        model_dir, max_steps=3, micro_batch_size=1, gradient_accumulation_steps=4, save_strategy="no",
        optimizer="sgd", learning_rate=1e-2, eval_steps=2,
    )  # fmt: skip
    assert run_inprocess(cfg, run_dir, cache) == 0
    monkeypatch.undo()
    eval_ids = [b["input_ids"] for b in evaluated]
    return seen, curve(run_dir, "loss_curve"), eval_ids, curve(run_dir, "eval_curve")


def test_a_joined_run_trains_as_its_micro_batches_in_fewer_passes(task_model_dir, uneven_rows, tmp_path, monkeypatch):
    # short samples and one long one (three samples' tokens as one): the run's largest micro-batch holds several
    long = {k: [t for r in uneven_rows[:3] for t in r[k]] for k in ("input_ids", "labels")}
    long["position_ids"] = list(range(len(long["input_ids"])))
    rows = [long, *uneven_rows[3:14]]  # 12 rows: the 3 steps' 4 samples each, every row once
    cache = write_cache(tmp_path / "cache", rows, uneven_rows[14:24])
    joined_inputs, joined_losses, joined_evals, joined_eval_losses = _train(
        task_model_dir, cache, tmp_path / "joined", monkeypatch, join=True
    )
    plain_inputs, plain_losses, plain_evals, plain_eval_losses = _train(
        task_model_dir, cache, tmp_path / "plain", monkeypatch, join=False
    )
    assert len(plain_inputs) == 12  # 3 steps × 4 micro-batches of one sample
    largest = max(len(r["input_ids"]) for r in rows)
    assert max(b["input_ids"].numel() for b in plain_inputs) == largest  # the long sample's micro-batch
    assert len(joined_inputs) < len(plain_inputs)
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].numel() <= largest for b in joined_inputs)
    # the same samples in the same order, each its own segment (position ids restart per sample)
    assert torch.cat([b["input_ids"][0] for b in joined_inputs]).tolist() == [
        t for b in plain_inputs for t in b["input_ids"][0].tolist()
    ]
    assert torch.cat([b["position_ids"][0] for b in joined_inputs]).tolist() == [
        p for b in plain_inputs for p in b["position_ids"][0].tolist()
    ]
    assert len(joined_losses) == 3 and joined_losses == pytest.approx(plain_losses, rel=1e-5)
    joined_adapter, plain_adapter = (adapter_tensors(tmp_path / d / "adapter") for d in ("joined", "plain"))
    for name, tensor in joined_adapter.items():
        torch.testing.assert_close(tensor, plain_adapter[name], rtol=1e-5, atol=1e-7)
    assert json.loads((tmp_path / "joined" / "summary.json").read_text())["joined_micro_batch_tokens"] == largest
    # the eval's samples joined too, up to the training's largest pass: the same samples in order, fewer forwards,
    # the same eval losses
    assert len(plain_evals) == 2 * 10 and len(joined_evals) < len(plain_evals)
    assert all(ids.shape[0] == 1 and ids.numel() <= largest for ids in joined_evals)
    assert torch.equal(torch.cat([ids[0] for ids in joined_evals]), torch.cat([ids[0] for ids in plain_evals]))
    assert len(joined_eval_losses) == 2 and joined_eval_losses == pytest.approx(plain_eval_losses, rel=1e-5)


def test_eval_batches_join_up_to_the_largest_forward_the_run_makes():
    from worker.train.evaluation import joined_chunks

    sizes = np.array([9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    chunks = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # 12, 4 and 4 tokens
    assert joined_chunks(sizes, chunks, None) == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]  # the largest: 12
    assert joined_chunks(sizes, chunks, 20) == [list(range(12))]  # the training's joined pass holds 20
    assert joined_chunks(sizes, chunks, 5) == joined_chunks(sizes, chunks, None)  # never under the eval's own


@pytest.mark.parametrize("seed", range(40))
def test_runs_split_to_a_count_keep_the_order_and_the_budget(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
    budget = max(sizes) + rng.randint(0, 60)
    runs = runs_within(sizes, budget)
    passes = rng.randint(len(runs), len(sizes))
    split = split_runs(runs, sizes, passes)
    assert len(split) == passes and [i for run in split for i in run] == list(range(len(sizes)))
    assert all(len(run) and sum(sizes[i] for i in run) <= budget for run in split)
    assert all(any(run.start >= r.start and run.stop <= r.stop for r in runs) for run in split)  # only cut, never moved
    assert [len(rows) for rows in joined(rows_of(sizes), budget, passes)] == [len(run) for run in split]


def test_a_cut_halves_the_run_of_most_tokens():
    sizes = [5, 1, 1, 1, 8, 2, 2]
    runs = runs_within(sizes, 10)
    assert runs == [range(0, 4), range(4, 6), range(6, 7)]
    assert split_runs(runs, sizes, 4) == [range(0, 4), range(4, 5), range(5, 6), range(6, 7)]  # 10 tokens: 8 | 2
    assert split_runs(runs, sizes, 5)[:2] == [range(0, 1), range(1, 4)]  # then 8 tokens: 5 | 1 1 1


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_joins_a_step_into_as_many_passes_as_the_rank_that_needs_most(world):
    from datasets import Dataset

    rng = np.random.default_rng(world)
    sizes = rng.lognormal(4, 1, 48).astype(int) + 2
    ds = Rows(Dataset.from_dict({k: [list(range(n)) for n in sizes] for k in FLATTENED}))
    plan = BatchPlan(len(sizes), 1, 4, world, seed=1)
    budget = largest_micro_tokens(sizes, plan, 6)
    uneven = 0
    for step in range(6):
        order = plan.epoch_order(step // plan.steps_per_epoch)
        own = [
            len(runs_within([int(sizes[i]) for micro in plan.micro_batches(step, rank, order) for i in micro], budget))
            for rank in range(world)
        ]
        steps = [read_step(ds, plan, step, r, 0, False, order, flatten=True, join_tokens=budget, sizes=sizes)
                 for r in range(world)]  # fmt: skip
        assert (
            [len(s.micro) for s in steps]
            == [max(own)] * world
            == [ranks_passes(sizes, plan, step, order, budget)] * world
        )
        uneven += min(own) < max(own)
        for rank, s in enumerate(steps):  # each rank's own samples, in order, within the budget
            ids = [int(n) for b in s.micro for n in np.diff(np.flatnonzero(np.r_[b["position_ids"][0] == 0, True]))]
            assert ids == [int(sizes[i]) for micro in plan.micro_batches(step, rank, order) for i in micro]
            assert all(b["input_ids"].numel() <= budget for b in s.micro)
    assert uneven  # some step's ranks joined into different counts on their own, and were evened


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sharding", [{}, {"fsdp_config": {"fsdp_version": 2}}], ids=["ddp", "fsdp2"])
def test_two_ranks_joined_train_as_their_micro_batches_in_fewer_passes(task_model_dir, uneven_rows, tmp_path, sharding):
    """DDP or FSDP2 over gloo, 2 ranks × 4 micro-batches of one sample: the joined runs (as many passes on both ranks,
    or the collectives would hang) give the unjoined runs' losses and adapter."""
    import subprocess
    import sys

    from tests.train.helpers import REPO, train_env, write_config

    long = {k: [t for r in uneven_rows[:3] for t in r[k]] for k in ("input_ids", "labels")}  # room to join the rest
    long["position_ids"] = list(range(len(long["input_ids"])))
    rows = [long, *uneven_rows[3:18]]
    cache = write_cache(tmp_path / "cache", rows, uneven_rows[18:22])
    sizes = np.array([len(r["input_ids"]) for r in rows])
    plan = BatchPlan(len(rows), 1, 4, 2, seed=42)  # the trainer's, at the config's default seed
    budget = largest_micro_tokens(sizes, plan, 2)
    own = [[len(runs_within([sizes[i] for m in plan.micro_batches(step, rank) for i in m], budget)) for rank in (0, 1)]
           for step in (0, 1)]  # fmt: skip
    assert any(a != b for a, b in own)  # on their own, the ranks would run different counts of passes in a step
    cfg = base_config(
        task_model_dir, max_steps=2, micro_batch_size=1, gradient_accumulation_steps=4, save_strategy="no",
        optimizer="sgd", learning_rate=1e-2, **sharding,
    )  # fmt: skip
    out = {}
    for arm, env in (("joined", {}), ("plain", {"FTW_JOIN_STEPS": "0"})):
        run_dir = tmp_path / arm
        ranks = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.train.joined_ranks"]
        argv = [sys.executable, *ranks, str(write_config(run_dir, cfg)), str(run_dir), str(cache), str(run_dir)]
        proc = subprocess.run(argv, env={**train_env(run_dir), **env}, cwd=REPO, capture_output=True, text=True,
                              timeout=500)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        forwards = [json.loads((run_dir / f"rank{r}.json").read_text())["forwards"] for r in (0, 1)]
        out[arm] = forwards, curve(run_dir, "loss_curve"), adapter_tensors(run_dir / "adapter")
    joined_forwards, joined_losses, joined_adapter = out["joined"]
    plain_forwards, plain_losses, plain_adapter = out["plain"]
    assert plain_forwards == [8, 8] and joined_forwards[0] == joined_forwards[1] < 8
    assert joined_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, tensor in joined_adapter.items():
        torch.testing.assert_close(tensor, plain_adapter[name], rtol=1e-5, atol=1e-7)

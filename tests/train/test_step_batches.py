"""The trainer's batches: the model sees, step by step, exactly the rows (seed, step) names — across epochs and
after a mid-epoch resume — and the loop's own thread reads them, so no second Python thread hands the interpreter's
lock back and forth with the loop's launches (bench/prefetch_cost.py measures what that cost)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tests.train.helpers import base_config, events, pack, run_inprocess, write_cache
from worker.train import batches as batches_module
from worker.train.batches import BatchPlan, StepBatches, collate, real_tokens, target_tokens

KEYS = ("input_ids", "labels", "position_ids", "attention_mask")


def capture_training_inputs(monkeypatch, stop_after: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Every training forward's inputs as the model receives them; with `stop_after`, the SIGTERM
    flag is raised during that forward (as the entry point's signal handler would)."""
    from worker.train.trainer import Trainer

    seen: list[dict[str, torch.Tensor]] = []
    setup = Trainer.setup

    def setup_and_hook(self):
        setup(self)

        def hook(module, args, kwargs):
            if module.training:
                seen.append({k: kwargs[k].detach().cpu().clone() for k in KEYS if k in kwargs})
                if len(seen) == stop_after:
                    self.stop_requested = True

        self.engine.register_forward_pre_hook(hook, with_kwargs=True)

    monkeypatch.setattr(Trainer, "setup", setup_and_hook)
    return seen


def direct_batches(cache, plan: BatchPlan, steps: int, pad_id: int, packed: bool) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of steps 0..steps-1 built the plain way: row by row, Python lists."""
    from datasets import load_from_disk

    ds = load_from_disk(str(cache / "train"))
    return [
        collate([ds[i] for i in micro], pad_id, packed)
        for step in range(steps)
        for micro in plan.micro_batches(step, rank=0)
    ]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_model_sees_the_planned_batches_across_epochs_and_a_mid_epoch_resume(
    task_model_dir, task_rows, tmp_path, monkeypatch, packed
):
    from transformers import AutoTokenizer

    train, _, _ = task_rows
    rows = pack(train[:24], 64) if packed else train[:10]
    cache = write_cache(tmp_path / "cache", rows, packed=packed)
    mbs = 1 if packed else 2
    # 4 rows a step over 10 rows (or the packed bins): a partial last step, wrap-around, 3+ epochs
    # unpacked rows on CUDA would run padding-free (joined into one row: tests/train/test_padding_free.py), not in
    # the layout of the collation compared with here
    cfg = base_config(
        task_model_dir, micro_batch_size=2, gradient_accumulation_steps=2, max_steps=8, save_strategy="no",
        **({} if packed else {"use_kernels": False}),
    )  # fmt: skip
    plan = BatchPlan(len(rows), mbs, 2, 1, cfg["seed"])
    assert 1 < plan.steps_per_epoch < 4  # 8 steps cross two epoch boundaries
    pad_id = AutoTokenizer.from_pretrained(task_model_dir).pad_token_id or 0
    expected = direct_batches(cache, plan, 8, pad_id, packed)

    # SIGTERM during step 5's first micro-batch: that step finishes, is saved, the run stops (75)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FTW_EVENTS", str(run_dir / "events.jsonl"))
    seen = capture_training_inputs(monkeypatch, stop_after=4 * 2 + 1)
    assert run_inprocess(cfg, run_dir, cache) == 75
    saved = json.loads((run_dir / "checkpoints" / "checkpoint-5" / "ftw_state.json").read_text())
    assert saved["step"] == 5 and 5 % plan.steps_per_epoch != 0  # resumed mid-epoch below
    assert len(seen) == 5 * 2

    assert run_inprocess(cfg, run_dir, cache) == 0  # resumes from checkpoint-5
    assert [e["resumed_from"] for e in events(run_dir) if e.get("event") == "start"] == [None, "checkpoint-5"]
    assert len(seen) == len(expected) == 8 * 2
    for i, (got, want) in enumerate(zip(seen, expected)):
        # on a GPU the varlen kernel's packed rows also carry an all-ones mask (kernels/ftw_kernels/attention.py)
        assert set(got) - set(want) <= ({"attention_mask"} if packed and torch.cuda.is_available() else set()), (
            f"micro-batch {i}"
        )
        for key in want:
            assert torch.equal(got[key], want[key]), f"micro-batch {i} (step {i // 2}): {key} differs"

    # the counts the loop reports were taken on the host from the same batches
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens"] == sum(real_tokens(b) for b in expected)
    assert summary["target_tokens"] == sum(target_tokens(b) for b in expected)
    assert [s for s, _ in summary["loss_curve"]] == list(range(1, 9))


def test_the_loop_reads_its_batches_on_its_own_thread(task_model_dir, task_rows, tmp_path, monkeypatch):
    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", train[:16])
    readers: list[threading.Thread] = []
    read_step = batches_module.read_step

    def read_and_note(*args, **kwargs):
        readers.append(threading.current_thread())
        return read_step(*args, **kwargs)

    monkeypatch.setattr(batches_module, "read_step", read_and_note)
    cfg = base_config(task_model_dir, micro_batch_size=2, max_steps=4, save_strategy="no")
    assert run_inprocess(cfg, tmp_path / "run", cache) == 0
    assert readers == [threading.main_thread()] * 4  # one read a step, each on the loop's thread


def test_a_read_error_is_raised_at_its_step(task_rows, tmp_path):
    from datasets import load_from_disk

    train, _, _ = task_rows
    ds = load_from_disk(str(write_cache(tmp_path / "cache", train[:6]) / "train"))
    plan = BatchPlan(
        num_rows=12, rows_per_micro=2, grad_accum=1, world_size=1, seed=0, shuffle=False
    )  # rows 6.. do not exist
    batches = StepBatches(ds, plan, 0, 0, False, range(0, 6), torch.device("cpu"))
    try:
        assert [batches.get(step).step for step in range(3)] == [0, 1, 2]
        with pytest.raises(IndexError):
            batches.get(3)
    finally:
        batches.close()


def test_pad_to_sequence_len_gives_every_micro_batch_its_width():
    """Unpacked rows of any length come out `pad_to` wide (pad_to_sequence_len: one shape every step)."""
    rows = [{"input_ids": [1] * n, "labels": [1] * n, "position_ids": list(range(n))} for n in (3, 9, 5, 7)]
    from datasets import Dataset

    ds = Dataset.from_list(rows)
    plan = BatchPlan(num_rows=4, rows_per_micro=2, grad_accum=1, world_size=1, seed=0, shuffle=False)
    batches = StepBatches(ds, plan, 0, 0, False, range(2), torch.device("cpu"), pad_to=16)
    try:
        widths = [m["input_ids"].shape for step in range(2) for m in batches.get(step).micro]
    finally:
        batches.close()
    assert widths == [(2, 16), (2, 16)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run through the device tool)")
def test_on_cuda_the_micro_batches_come_out_already_on_the_device():
    """Pinned and copied without blocking; the values are the CPU collation's."""
    rows = [{"input_ids": [i + 1] * n, "labels": [1] * n, "position_ids": list(range(n))} for i, n in enumerate((3, 9))]
    from datasets import Dataset

    plan = BatchPlan(num_rows=2, rows_per_micro=2, grad_accum=1, world_size=1, seed=0, shuffle=False)
    on_cpu = StepBatches(Dataset.from_list(rows), plan, 0, 0, False, range(1), torch.device("cpu"))
    on_gpu = StepBatches(Dataset.from_list(rows), plan, 0, 0, False, range(1), torch.device("cuda", 0))
    try:
        (want,), (got,) = on_cpu.get(0).micro, on_gpu.get(0).micro
    finally:
        on_cpu.close(), on_gpu.close()
    assert want.keys() == got.keys() and all(v.is_cuda for v in got.values() if isinstance(v, torch.Tensor))
    assert all(torch.equal(got[k].cpu(), want[k]) for k in want if isinstance(want[k], torch.Tensor))


def test_rows_are_the_splits_rows_across_sliced_chunks_and_an_index_mapping():
    """`Rows` reads Arrow's buffers itself: every row equals datasets' own, whatever the chunks' offsets."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from worker.train.batches import Rows

    lists = [list(range(i, i + i % 5 + 1)) for i in range(30)]
    table = pa.table({k: pa.array([[v * (j + 1) for v in r] for r in lists], pa.list_(pa.int32()))
                      for j, k in enumerate(("input_ids", "labels", "position_ids"))})  # fmt: skip
    ds = Dataset(InMemoryTable(pa.concat_tables([table.slice(3, 10), table.slice(17, 9)])))
    assert ds.data.table.column("input_ids").num_chunks == 2
    for split in (ds, ds.select([5, 1, 18, 18, 0])):
        rows = Rows(split)
        assert len(rows) == len(split)
        for i, want in enumerate(split):
            got = rows.row(i)
            assert got.keys() == want.keys()
            assert all(np.array_equal(got[k], want[k]) for k in want), i


def test_a_step_read_from_the_memory_mapped_split_warns_of_nothing(task_rows, tmp_path):
    """`Rows` hands out read-only views of the split's buffers; collating them must not put torch's warning about
    non-writable arrays into the user's log."""
    import warnings

    from datasets import load_from_disk

    from worker.train.batches import Rows, read_step

    train, _, _ = task_rows
    ds = load_from_disk(str(write_cache(tmp_path / "cache", train[:8]) / "train"))
    plan = BatchPlan(num_rows=8, rows_per_micro=4, grad_accum=1, world_size=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for flatten in (False, True):
            step = read_step(Rows(ds), plan, 0, 0, 0, False, varlen=True, target_rows=True, flatten=flatten)
            (indices,) = plan.micro_batches(0, 0)
            assert step.tokens == sum(len(ds[i]["input_ids"]) for i in indices)

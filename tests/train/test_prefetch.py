"""The batch prefetcher changes when batches are built, never which: the model sees, step by step,
exactly the rows (seed, step) names — across epochs and after a mid-epoch resume — and the thread
never outlives the loop (normal end, error, SIGTERM in a real child process)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest
import torch

from tests.conftest import REPO
from tests.train.helpers import (
    base_config,
    events,
    pack,
    run_inprocess,
    train_argv,
    train_env,
    write_cache,
    write_config,
)
from worker.train.batches import BatchPlan, Prefetcher, collate, real_tokens, target_tokens

KEYS = ("input_ids", "labels", "position_ids", "attention_mask")


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ftw-prefetch"]


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
    assert not prefetch_threads()
    saved = json.loads((run_dir / "checkpoints" / "checkpoint-5" / "ftw_state.json").read_text())
    assert saved["step"] == 5 and 5 % plan.steps_per_epoch != 0  # resumed mid-epoch below
    assert len(seen) == 5 * 2

    assert run_inprocess(cfg, run_dir, cache) == 0  # resumes from checkpoint-5
    assert not prefetch_threads()
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


def test_a_training_error_stops_the_prefetcher(task_model_dir, task_rows, tmp_path):
    from worker.errors import TrainingError

    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", train[:16])
    cfg = base_config(
        task_model_dir, max_steps=50, loss_watchdog_threshold=0.5, loss_watchdog_patience=2, save_strategy="no"
    )
    with pytest.raises(TrainingError, match="at step 2"):
        run_inprocess(cfg, tmp_path / "run", cache)
    assert not prefetch_threads()


def test_a_read_error_in_the_thread_is_raised_at_its_step(task_rows, tmp_path):
    from datasets import load_from_disk

    train, _, _ = task_rows
    ds = load_from_disk(str(write_cache(tmp_path / "cache", train[:6]) / "train"))
    plan = BatchPlan(
        num_rows=12, rows_per_micro=2, grad_accum=1, world_size=1, seed=0, shuffle=False
    )  # rows 6.. do not exist
    batches = Prefetcher(ds, plan, 0, 0, False, range(0, 6), torch.device("cpu"))
    try:
        assert [batches.get(step).step for step in range(3)] == [0, 1, 2]
        with pytest.raises(IndexError):
            batches.get(3)
    finally:
        batches.close()
    assert not prefetch_threads()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_while_batches_are_prefetched_saves_and_exits_75(task_model_dir, task_rows, tmp_path):
    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", pack(train[:200], 128), packed=True, sequence_len=128)
    run_dir = tmp_path / "run"
    cfg = base_config(task_model_dir, micro_batch_size=1, max_steps=400, save_strategy="no", sequence_len=128)
    proc = subprocess.Popen(
        train_argv(write_config(run_dir, cfg), run_dir, cache),
        env=train_env(run_dir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(e.get("step", 0) >= 3 and "loss" in e for e in events(run_dir)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the prefetcher is two steps ahead, blocked on its full queue
        assert proc.wait(timeout=60) == 75, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    preempted = [e for e in events(run_dir) if e.get("event") == "preempted"]
    assert len(preempted) == 1 and preempted[0]["step"] < 400
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{preempted[0]['step']}" / "ftw_state.json").read_text())
    assert state["complete"] is True and state["step"] == preempted[0]["step"]
    assert [s for s, _ in state["loop"]["train_loss"]] == list(range(1, state["step"] + 1))


def test_pad_to_sequence_len_gives_every_prefetched_micro_batch_its_width():
    """Unpacked rows of any length come out `pad_to` wide (pad_to_sequence_len: one shape every step)."""
    rows = [{"input_ids": [1] * n, "labels": [1] * n, "position_ids": list(range(n))} for n in (3, 9, 5, 7)]
    from datasets import Dataset

    ds = Dataset.from_list(rows)
    plan = BatchPlan(num_rows=4, rows_per_micro=2, grad_accum=1, world_size=1, seed=0, shuffle=False)
    batches = Prefetcher(ds, plan, 0, 0, False, range(2), torch.device("cpu"), pad_to=16)
    try:
        widths = [m["input_ids"].shape for step in range(2) for m in batches.get(step).micro]
    finally:
        batches.close()
    assert widths == [(2, 16), (2, 16)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run through the device tool)")
def test_on_cuda_the_prefetch_thread_hands_out_micro_batches_already_on_the_device():
    """The copies are queued by the thread (the loop launches none); the values are the CPU collation's."""
    rows = [{"input_ids": [i + 1] * n, "labels": [1] * n, "position_ids": list(range(n))} for i, n in enumerate((3, 9))]
    from datasets import Dataset

    plan = BatchPlan(num_rows=2, rows_per_micro=2, grad_accum=1, world_size=1, seed=0, shuffle=False)
    on_cpu = Prefetcher(Dataset.from_list(rows), plan, 0, 0, False, range(1), torch.device("cpu"))
    on_gpu = Prefetcher(Dataset.from_list(rows), plan, 0, 0, False, range(1), torch.device("cuda", 0))
    try:
        (want,), (got,) = on_cpu.get(0).micro, on_gpu.get(0).micro
    finally:
        on_cpu.close(), on_gpu.close()
    assert want.keys() == got.keys() and all(v.is_cuda for v in got.values() if isinstance(v, torch.Tensor))
    assert all(torch.equal(got[k].cpu(), want[k]) for k in want if isinstance(want[k], torch.Tensor))

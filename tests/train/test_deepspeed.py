"""DeepSpeed's engine for real: two processes on CPU (gloo) under torchrun, ZeRO-1/2/3 from the
presets axolotl's bundled files map to and from a user's dict, give the loss curve and adapter
one process gives with the same global batch; a checkpoint written under ZeRO resumes to the
same adapter; SIGTERM saves; `deepspeed_as_fsdp: true` is what selects FSDP2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import REPO
from tests.train.helpers import (
    adapter_tensors,
    base_config,
    events,
    run_inprocess,
    run_train,
    train_argv,
    train_env,
    write_cache,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# a schedule that moves and a clip that bites: DeepSpeed's optimizer wrapper must leave both to ftw's numbers
SETTINGS = dict(
    micro_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=4,
    lr_scheduler="linear",
    warmup_steps=1,
    max_grad_norm=0.5,
    save_strategy="no",
    eval_steps=2,
)


@pytest.fixture(scope="module")
def reference(task_model_dir, task_rows, tmp_path_factory):
    """One process, micro-batch 2 × gradient accumulation 2 = a global batch of 4 rows."""
    train, held, _ = task_rows
    root = tmp_path_factory.mktemp("ds")
    cache = write_cache(root / "cache", train[:32], held[:8])
    cfg = base_config(task_model_dir, **SETTINGS)
    assert run_inprocess(cfg, root / "single", cache) == 0
    return cfg, cache, root


def two_ranks(cfg: dict, **over) -> dict:
    return {**cfg, "gradient_accumulation_steps": 1, **over}  # 2 ranks × micro-batch 2 = the same 4 rows per step


def assert_matches_single(root, name: str, reference: str = "single", rel: float = 1e-5) -> dict:
    summary = json.loads((root / name / "summary.json").read_text())
    single = json.loads((root / reference / "summary.json").read_text())
    assert [loss for _, loss in summary["loss_curve"]] == pytest.approx(
        [loss for _, loss in single["loss_curve"]], rel=rel
    )
    assert summary["eval_curve"][-1][1] == pytest.approx(single["eval_curve"][-1][1], rel=rel)
    ours, ref = adapter_tensors(root / name / "adapter"), adapter_tensors(root / reference / "adapter")
    assert set(ours) == set(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)
    return summary


def assert_zero_stage_matches_single(proc, root, name: str, stage: int) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = assert_matches_single(root, name)
    assert summary["world_size"] == 2 and summary["strategy"] == "deepspeed"
    assert f"ZeRO stage {stage}" in proc.stderr  # DeepSpeed's engine ran, not a stand-in


@pytest.mark.parametrize("deepspeed", ["zero1", "zero3"])  # zero2: the uninterrupted run of the resume test
def test_zero_stages_match_one_process(reference, deepspeed):
    cfg, cache, root = reference
    proc = run_train(two_ranks(cfg, deepspeed=deepspeed), root / deepspeed, cache, nproc=2, timeout=800)
    assert_zero_stage_matches_single(proc, root, deepspeed, int(deepspeed[-1]))


def test_user_dict_with_auto_values(reference):
    """A user's DeepSpeed JSON as HF/axolotl write it ("auto" for what the trainer fills), with
    gradient accumulation inside each rank (2 ranks × micro-batch 1 × 2 steps). Plain SGD, no clip:
    its update follows the gradient's scale, so a loss DeepSpeed divided again by the accumulation
    steps would show (Adam or a biting clip would hide it)."""
    cfg, cache, root = reference
    sgd = {**cfg, "optimizer": "sgd", "learning_rate": 0.5, "max_grad_norm": None}
    assert run_inprocess(sgd, root / "single-sgd", cache) == 0
    user = {
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    proc = run_train(
        {**sgd, "micro_batch_size": 1, "gradient_accumulation_steps": 2, "deepspeed": user},
        root / "user",
        cache,
        nproc=2,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_matches_single(root, "user", reference="single-sgd")


def test_zero2_matches_one_process_and_resumes_to_the_same_adapter(reference):
    """ZeRO-2 over two ranks, run to step 4 saving every 2 steps, gives one process's curve and adapter
    (ZeRO-1/3: test_zero_stages_match_one_process); then the same run again from checkpoint-2: the adapter
    equals the uninterrupted run's, so DeepSpeed's optimizer partitions, the schedule and the loop state all
    came back."""
    cfg, cache, root = reference
    run = root / "resumed"
    over = two_ranks(cfg, deepspeed="zero2", save_strategy="steps", save_steps=2, auto_resume_from_checkpoints=True)
    proc = run_train(over, run, cache, nproc=2, timeout=800)
    assert_zero_stage_matches_single(proc, root, "resumed", 2)
    ckpt2 = run / "checkpoints" / "checkpoint-2"
    assert (ckpt2 / "deepspeed").is_dir() and not (ckpt2 / "optimizer.pt").exists()
    for later in (p for p in (run / "checkpoints").glob("checkpoint-*") if p != ckpt2):
        shutil.rmtree(later)
    shutil.rmtree(run / "adapter")
    proc = run_train(over, run, cache, nproc=2, timeout=800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any(e.get("event") == "start" and e.get("resumed_from") == "checkpoint-2" for e in events(run))
    assert_matches_single(root, "resumed")


def test_sigterm_saves_a_resumable_checkpoint(reference):
    """SIGTERM to the torchrun group mid-run under ZeRO-3: a preempted stop and a complete checkpoint with
    the adapter and DeepSpeed's state, written by both ranks."""
    from worker.train.checkpoint import newest_complete, read_state

    cfg, cache, root = reference
    run = root / "sigterm"
    config = write_config(run, two_ranks(cfg, deepspeed="zero3", max_steps=10_000, eval_steps=None))
    child = subprocess.Popen(
        train_argv(config, run, cache, nproc=2),
        env=train_env(run),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(2400):  # wait for real steps (readiness, not a timer), bounded
            if child.poll() is not None or any("loss" in e and (e.get("step") or 0) >= 2 for e in events(run)):
                break
            time.sleep(0.25)
        assert child.poll() is None, child.stderr.read()[-4000:]
        os.killpg(child.pid, signal.SIGTERM)
        _, err = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    # torchrun's agent, signalled too, exits 1; the ranks saved and stopped (the job's supervisor
    # reports Preempted from its own stop reason)
    assert any(e.get("event") == "preempted" for e in events(run)), err[-4000:]
    saved = newest_complete(run / "checkpoints")
    assert saved is not None and (saved / "adapter_model.safetensors").is_file()
    assert read_state(saved)["world_size"] == 2
    assert {p.name for p in (saved / "deepspeed" / "state").glob("*optim_states.pt")} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }

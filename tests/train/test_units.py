"""The pure parts of the train stage: batch order, schedule arithmetic, checkpoint files, optimizer
and scheduler registries, what the train child checks itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from schemas.config import TrainingConfig
from schemas.optimizers import OPTIMIZERS
from tests.conftest import child_env
from worker.errors import JobSpecError
from worker.train import checkpoint as ckpt
from worker.train.batches import BatchPlan
from worker.train.optim import build_optimizer, build_scheduler
from worker.train.schedule import Schedule


def cfg(**over) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {"base_model": "/m", "learning_rate": 1e-3, "datasets": [{"path": "d.jsonl", "type": "completion"}], **over}
    )


# ---- batch order ----------------------------------------------------------------------------------
def test_a_step_reads_the_same_rows_whatever_the_number_of_processes():
    one = BatchPlan(num_rows=50, rows_per_micro=2, grad_accum=4, world_size=1, seed=3)
    two = BatchPlan(num_rows=50, rows_per_micro=2, grad_accum=2, world_size=2, seed=3)
    for step in range(12):  # crosses the epoch boundary (7 steps per epoch)
        rows_one = sorted(i for m in one.micro_batches(step, 0) for i in m)
        rows_two = sorted(i for r in range(2) for m in two.micro_batches(step, r) for i in m)
        assert rows_one == rows_two and len(rows_one) == 8


def test_every_row_is_seen_each_epoch_and_epochs_are_reshuffled():
    plan = BatchPlan(num_rows=10, rows_per_micro=3, grad_accum=1, world_size=1, seed=0)
    assert plan.steps_per_epoch == 4
    first = [i for s in range(4) for m in plan.micro_batches(s, 0) for i in m]
    assert set(first) == set(range(10)) and len(first) == 12  # wrap-around fills the last step
    second = [i for s in range(4, 8) for m in plan.micro_batches(s, 0) for i in m]
    assert set(second) == set(range(10)) and second != first


# ---- schedule --------------------------------------------------------------------------------------
def test_schedule_follows_axolotl_keys():
    s = Schedule.from_config(cfg(num_epochs=2.5), steps_per_epoch=10, has_eval=True)
    assert s.total_steps == 25 and s.save_every == 10 and s.eval_every is None
    s = Schedule.from_config(cfg(max_steps=40, save_steps=0.25, eval_steps=5), steps_per_epoch=10, has_eval=True)
    assert (s.total_steps, s.save_every, s.eval_every) == (40, 10, 5)
    s = Schedule.from_config(cfg(saves_per_epoch=2, evals_per_epoch=5), steps_per_epoch=10, has_eval=True)
    assert (s.save_every, s.eval_every) == (5, 2)
    assert Schedule.from_config(cfg(save_strategy="no"), 10, False).save_every is None
    assert not Schedule.from_config(cfg(max_steps=10, save_steps=5), 10, False).save_due(
        10
    )  # results follow the last step


# ---- checkpoint files ------------------------------------------------------------------------------
def make_checkpoint(root, step, payload=b"weights"):
    tmp = ckpt.tmp_dir(root, step)
    (tmp / "trainable.safetensors").write_bytes(payload * 100)
    return ckpt.finalize(tmp, step, {"loop": {}})


def test_only_complete_and_intact_checkpoints_are_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    make_checkpoint(root, 2)
    newest = make_checkpoint(root, 4)
    assert ckpt.newest_complete(root) == newest
    # a save killed half-way: a temporary folder, and a folder without ftw_state.json
    (ckpt.tmp_dir(root, 6) / "trainable.safetensors").write_bytes(b"partial")
    (root / "checkpoint-8").mkdir()
    assert ckpt.newest_complete(root) == newest
    # the newest one truncated on disk after it was written
    f = newest / "trainable.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    assert ckpt.read_state(newest) is None
    assert ckpt.newest_complete(root).name == "checkpoint-2"
    # a state file that does not say complete
    state = json.loads((root / "checkpoint-2" / "ftw_state.json").read_text())
    (root / "checkpoint-2" / "ftw_state.json").write_text(json.dumps({**state, "complete": False}))
    assert ckpt.newest_complete(root) is None


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        make_checkpoint(root, step)
    ckpt.rotate(root, keep=2, protect=root / "checkpoint-1")
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["checkpoint-1", "checkpoint-4", "checkpoint-5"]


# ---- optimizers and schedules ----------------------------------------------------------------------
def test_optimizers_by_axolotl_name_and_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(
        cfg(optimizer="adamw_torch", weight_decay=0.1, adam_beta2=0.95), model.named_parameters(), torch.device("cpu")
    )
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # biases and norms are not decayed
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert isinstance(
        build_optimizer(cfg(optimizer="sgd", optim_args="momentum=0.9"), model.named_parameters(), torch.device("cpu")),
        torch.optim.SGD,
    )
    with pytest.raises(JobSpecError, match="bitsandbytes"):
        build_optimizer(cfg(optimizer="paged_adamw_8bit"), model.named_parameters(), torch.device("cpu"))


@pytest.mark.parametrize(
    "name",
    ["cosine", "linear", "constant_with_warmup", "rex", "one_cycle", "warmup_stable_decay", "cosine_with_min_lr"],
)
def test_schedulers_warm_up_then_decay(name):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(
        cfg(lr_scheduler=name, warmup_steps=5, cosine_min_lr_ratio=0.1 if name == "cosine_with_min_lr" else None),
        opt,
        total_steps=50,
    )
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] and max(lrs) <= 1.0 + 1e-9
    if name != "constant_with_warmup":
        assert lrs[-1] < max(lrs)


def test_every_registered_optimizer_builds_on_a_tiny_model_or_names_what_it_needs():
    """schemas/optimizers.py is the one list: what the CPU can build is built here, with the config's
    learning rate (and betas for the Adam family); what needs a CUDA GPU says so."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 2, bias=False))  # 2-D: muon too
    for name, spec in OPTIMIZERS.items():
        config = cfg(optimizer=name, learning_rate=0.01, adam_beta2=0.95)
        if spec.needs_cuda:
            with pytest.raises(JobSpecError, match=f"optimizer {name} needs bitsandbytes on a CUDA GPU"):
                build_optimizer(config, model.named_parameters(), torch.device("cpu"))
            continue
        opt = build_optimizer(config, model.named_parameters(), torch.device("cpu"))
        assert type(opt).__name__ == spec.class_name and opt.param_groups[0]["lr"] == 0.01, name
        assert opt.defaults.get("betas") == ((0.9, 0.95) if spec.adam else opt.defaults.get("betas")), name
        for key, value in spec.fixed.items():
            assert opt.defaults[key] == value, (name, key)
        loss = model(torch.ones(1, 4)).sum()
        loss.backward()
        opt.step()  # it trains
        opt.zero_grad()


def test_the_train_child_does_not_run_the_machine_checks_again():
    """The orchestrator's checks stage runs them once per job; the train child used to re-run
    check_machine before loading (worker/train/model.py's preflight)."""
    probe = (
        "import sys, worker.train.child, worker.train.trainer, worker.train.model; "
        "print(sorted(m for m in sys.modules if m.startswith(('worker.checks', 'worker.preflight'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_quantized_loading_without_cuda_in_the_child_is_a_clear_error_before_any_load():
    """What the child's check_machine guaranteed (torch's view of CUDA) still holds where it is used."""
    from worker.train.model import Precision, load_model

    with pytest.raises(JobSpecError, match="need a CUDA GPU") as e:
        load_model(
            cfg(base_model="/nowhere", adapter="qlora", load_in_4bit=True),
            None,
            Precision(torch.float32, None, False),
            torch.device("cpu"),
        )
    assert "adapter: lora" in e.value.hint


# ---- multi-process strategy -------------------------------------------------------------------------
def test_sharding_keys_map_to_ddp_or_fsdp2():
    from worker.train.distributed import Topology, strategy

    two = Topology(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    assert strategy(cfg(), Topology(0, 0, 1, torch.device("cpu"))) == {"kind": "single"}
    assert strategy(cfg(), two) == {"kind": "ddp"}
    assert strategy(cfg(fsdp=["full_shard", "auto_wrap"]), two) == {"kind": "fsdp2", "reshard": True, "offload": False}
    assert strategy(cfg(fsdp=["shard_grad_op", "offload"]), two) == {"kind": "fsdp2", "reshard": False, "offload": True}
    assert strategy(cfg(fsdp_config={"fsdp_version": 2, "reshard_after_forward": False}), two)["reshard"] is False
    # DeepSpeed configs run DeepSpeed's engine; FSDP2 with the same sharding only when asked for
    assert strategy(cfg(deepspeed="zero2"), two) == {"kind": "deepspeed", "stage": 2}
    assert strategy(cfg(deepspeed={"zero_optimization": {"stage": 3}}), two) == {"kind": "deepspeed", "stage": 3}
    assert strategy(cfg(deepspeed="zero2", deepspeed_as_fsdp=True), two) == {
        "kind": "fsdp2",
        "reshard": False,
        "offload": False,
    }
    assert strategy(cfg(deepspeed="zero3", deepspeed_as_fsdp=True), two) == {
        "kind": "fsdp2",
        "reshard": True,
        "offload": False,
    }
    assert strategy(cfg(deepspeed="zero3_offload", deepspeed_as_fsdp=True), two) == {
        "kind": "fsdp2",
        "reshard": True,
        "offload": True,
    }
    assert strategy(cfg(deepspeed={"zero_optimization": {"stage": 3}}, deepspeed_as_fsdp=True), two)["reshard"] is True


def test_deepspeed_config_fills_the_keys_ftw_owns():
    """A user's HF/axolotl-style DeepSpeed JSON: "auto" and stale numbers give way to the ftw config's
    batch shape, clip and precision; the user's other ZeRO settings are kept."""
    from worker.train.deepspeed_engine import build_config

    user = {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": "auto", "overlap_comm": True},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": True, "loss_scale": 0},
        "train_batch_size": 999,
        "gradient_clipping": "auto",
    }
    ds = build_config(
        cfg(deepspeed=user, max_grad_norm=0.7),
        rows_per_micro=2,
        grad_accum=3,
        world_size=2,
        precision_dtype=torch.bfloat16,
    )
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2,
        3,
        12,
    )
    assert (
        ds["gradient_clipping"] == 0.7
        and ds["bf16"] == {"enabled": True}
        and ds["fp16"] == {"enabled": False, "loss_scale": 0}
    )
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["zero_allow_untested_optimizer"] is True
    assert build_config(cfg(deepspeed="zero3_offload"), 1, 1, 2, None)["zero_optimization"]["offload_param"] == {
        "device": "cpu"
    }


def test_progress_reports_events_and_draws_a_bar_on_a_terminal(tmp_path, monkeypatch):
    import io
    import sys

    from worker.train.reporting import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("FTW_EVENTS", str(tmp_path / "events.jsonl"))
    progress = Progress(cfg(logging_steps=2), tmp_path, total_steps=4, first_step=0, enabled=True, device=None)
    for step in range(1, 5):
        progress.step(step, 100 * step, {"loss": 2.0 / step, "lr": 1e-3, "grad_norm": 0.5})
    progress.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [2, 4]
    assert all(
        {"stage", "step", "total_steps", "loss", "lr", "grad_norm", "tokens_per_s", "eta_s"} <= set(e) for e in events
    )
    assert events[0]["eta_s"] is not None and events[-1]["eta_s"] == 0
    assert "4/4" in screen.getvalue() and "loss=0.5000" in screen.getvalue()


def test_pace_leaves_the_first_steps_compile_out_of_tokens_per_s_and_the_eta():
    """A first step of 30 s (kernel compiles) then 1 s a step of 1,000 tokens, 100 steps: once a second step is
    recorded, the rate and the time left are those of the steps since the first, not of the whole 30 s."""
    from worker.train.reporting import Pace

    pace = Pace(started=0.0, steps_before=0, total=100)
    rate, left = pace.at(1, 1000, now=30.0)  # only the first step: measured from the start
    assert rate == pytest.approx(1000 / 30) and left == pytest.approx(30.0 * 99)
    rate, left = pace.at(11, 11_000, now=40.0)
    assert rate == pytest.approx(1000.0) and left == pytest.approx(89.0)  # not 320 s: 40 s / 11 steps is 3.6 s a step
    resumed = Pace(started=0.0, steps_before=50, total=100)  # a resumed run counts its own steps and tokens
    assert resumed.at(51, 1000, now=35.0) == (pytest.approx(1000 / 35), pytest.approx(35.0 * 49))
    assert resumed.at(61, 11_000, now=45.0) == (pytest.approx(1000.0), pytest.approx(39.0))


def test_pace_on_cuda_times_the_steps_on_the_gpus_clock():
    """The host records each step 1.5 s (steps) after it ended, the last on time (its queue two steps deep): by the
    host's clock 10 steps of 1 s would read 8.5 s, a rate 18% high; their `step_ms` say 10 s."""
    from worker.train.reporting import Pace

    pace = Pace(started=0.0, steps_before=0, total=20)
    pace.at(1, 1000, now=31.5, step_ms=30_000.0)
    for step in range(2, 12):
        recorded = 40.0 if step == 11 else 30.0 + (step - 1) + 1.5  # ended at 30 + (step - 1); the last on time
        rate, left = pace.at(step, 1000 * step, now=recorded, step_ms=1000.0)
    assert rate == pytest.approx(1000.0) and left == pytest.approx(9.0) and pace.steps_rate == pytest.approx(1000.0)
    host = Pace(started=0.0, steps_before=0, total=20)  # without GPU times (the CPU): the host's clock
    host.at(1, 1000, now=31.5)
    assert host.at(11, 11_000, now=40.0)[0] == pytest.approx(10_000 / 8.5)


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte
    record headers, records split FIRST/MIDDLE/LAST) of wandb's own protobuf Records."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, rows = run_file.read_bytes(), 7, b"", []  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


@pytest.fixture(scope="module")
def reported_run(task_model_dir, small_cache, tmp_path_factory):
    """One 3-step train child with both reporters on (wandb offline and TensorBoard): each test below reads
    its own reporter's files from it (one run instead of two: a train child's start is most of its time)."""
    from tests.train.helpers import base_config, events, run_train

    run_dir = tmp_path_factory.mktemp("reported") / "run"
    cfg = base_config(
        task_model_dir,
        max_steps=3,
        logging_steps=1,
        eval_steps=3,
        wandb_project="ftw-test",
        wandb_mode="offline",
        use_tensorboard=True,
    )
    proc = run_train(cfg, run_dir, small_cache, timeout=300)
    steps = [e for e in events(run_dir) if e.get("stage") == "train" and "loss" in e and "event" not in e]
    return proc, run_dir, steps


def test_wandb_offline_run_records_the_numbers_the_trainer_reports(reported_run):
    """The real wandb client (offline mode, no network) gets each step's loss, lr and grad norm as
    the trainer's own events report them, and the eval loss."""
    proc, run_dir, steps = reported_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [h["_step"] for h in history] == [e["step"] for e in steps] == [1, 2, 3]
    for row, event in zip(history, steps):
        assert (row["train/loss"], row["train/lr"], row["train/grad_norm"]) == (
            event["loss"],
            event["lr"],
            event["grad_norm"],
        )
    assert history[-1]["eval/loss"] > 0


def test_tensorboard_events_hold_the_numbers_the_trainer_reports(reported_run):
    """Read back with TensorBoard's own EventAccumulator: each step's loss as the events report it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc, run_dir, steps = reported_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    logged = board.Scalars("train/loss")
    assert [s.step for s in logged] == [e["step"] for e in steps] == [1, 2, 3]
    assert all(abs(s.value - e["loss"]) < 1e-5 for s, e in zip(logged, steps))  # stored as float32


def test_an_out_of_memory_hint_names_the_allocator_only_where_the_checks_kept_fixed_segments():
    """Under fixed segments (worker/checks/gpu.allocator_conf) the error also says how to go back to expandable ones;
    under expandable ones, or the operator's own setting, it gives the config changes alone."""
    from worker.checks.gpu import CACHING, EXPANDABLE
    from worker.train.reporting import OOM_HINT, oom_hint

    fixed = oom_hint({"PYTORCH_CUDA_ALLOC_CONF": CACHING})
    assert fixed.startswith(OOM_HINT) and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in fixed
    for env in ({"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE}, {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}, {}):
        assert oom_hint(env) == OOM_HINT

"""The training loop: our own, on torch + transformers + peft, not HF Trainer. Why:

- Checkpoints must be atomic and verified (temporary name, sha256, rename), resume must be exact
  (data order from (seed, step), RNG, optimizer, scheduler), and SIGTERM must save at a step
  boundary and exit 75. HF Trainer writes checkpoints in place, keeps data position in a
  dataloader it rebuilds, and spreads these decisions over callbacks and flags; overriding its
  internals would be longer and more fragile than the ~150 lines of loop below.
- Everything the loop needs from the ecosystem is still used as is: models and loss from
  transformers (packed position_ids → per-sample attention), adapters and their files from peft,
  schedulers from transformers, DDP / FSDP2 and distributed state dicts from torch, ZeRO from
  DeepSpeed's engine (worker/train/deepspeed_engine.py).

Shape (torchtune's recipe layout): `setup()` builds tokenizer → model → adapter → kernels →
sharding → optimizer → scheduler → resume; `train()` runs steps until max steps, early stop or
SIGTERM; `save_checkpoint()` / `load_checkpoint()`; `finish()` writes the run folder's results.
The loss of a step is the mean over every target token of the global batch (all micro-batches,
all ranks), whatever the split: `num_items_in_batch` is the global count.

The host never waits for the device inside a step: batches come from `batches.StepBatches`, and each
step's numbers come back through `step_queue` (its docstring says how and why).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections import deque
from pathlib import Path

import torch

from schemas.config import TrainingConfig
from worker.data.cache import PreparedData
from worker.data.rows import lengths
from worker.data.tokenizer import load_tokenizer
from worker.errors import JobSpecError, OutOfMemory
from worker.events import EXIT_OK, EXIT_PREEMPTED
from worker.train import checkpoint as ckpt
from worker.train import deepspeed_engine as ds_
from worker.train import distributed as dist_
from worker.train.adapters import attach
from worker.train.batches import BatchPlan, StepBatches, StepInput, join_budget, layout_name, padding_free
from worker.train.checkpoint import CheckpointState, GatheredWeights, LoopState, TrainingObjects
from worker.train.evaluation import eval_chunks, evaluate
from worker.train.graphed_update import GraphedUpdate, graph_blocker
from worker.train.loss_guard import LossGuard
from worker.train.model import apply_kernel_patches, compile_if_asked, load_model, resolve_precision
from worker.train.moe import configure_router_loss
from worker.train.objective import build_objective
from worker.train.offload import ActivationOffloader
from worker.train.optim import build_optimizer, build_scheduler, clip_gradients
from worker.train.profile import StepProfiler
from worker.train.reporting import Progress, oom_hint, peak_memory_gib
from worker.train.schedule import Schedule
from worker.train.step_queue import STEPS_AHEAD, QueuedStep, Readout, device_mark, freeze_heap

log = logging.getLogger("ftw.train")


class Trainer:
    def __init__(self, cfg: TrainingConfig, run_dir: Path, data: PreparedData, topo: dist_.Topology):
        self.cfg, self.run_dir, self.data, self.topo = cfg, Path(run_dir), data, topo
        self.state = LoopState()
        self.stop_requested = False  # set by the SIGTERM handler of the entry point
        self.resumed_from: str | None = None
        self.kernels: list[str] = []
        self.setup_peak_bytes = 0  # CUDA: the allocator's peak before the first step (loading, set-up)

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, topo = self.cfg, self.topo
        torch.manual_seed(cfg.seed)  # the same seed on every rank: identical adapter init
        self.precision = resolve_precision(cfg, topo.device)
        if self.precision.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.tokenizer = load_tokenizer(cfg)
        base = load_model(cfg, self.tokenizer, self.precision, topo.device)
        self.model = attach(base, cfg)
        self.kernels = apply_kernel_patches(self.model, cfg)
        self.model.train()
        # one offloader a run: its side stream and pinned buffers serve every step
        offload = cfg.activation_offloading or cfg.gradient_checkpointing == "offload"
        self.offloader = ActivationOffloader(topo.device) if offload else None
        if cfg.activation_offloading in ("disk", "legacy"):
            log.warning(
                "activation_offloading: %s offloads to host memory (ftw has no disk offload)", cfg.activation_offloading
            )
        self.strategy = dist_.strategy(cfg, topo)["kind"]
        self.engine = dist_.wrap(self.model, cfg, topo)
        compile_if_asked(self.model, cfg, topo.device)
        mbs, gas = cfg.batch_shape()
        self.plan = BatchPlan(len(self.data.train), 1 if self.data.packed else mbs, gas, topo.world_size, cfg.seed)
        router_loss = configure_router_loss(self.model, cfg, self.plan.micro_per_step)
        # SFT, the DPO family or GRPO: what a micro-batch's loss is (and the router's aux loss, logged)
        self.objective = build_objective(
            cfg, self.model, self.tokenizer, router_loss=router_loss, run_dir=self.run_dir, kernels=self.kernels
        )
        self.padding_free = padding_free(cfg, self.data.packed, self.kernels)
        has_eval = self.data.eval is not None
        self.schedule = Schedule.from_config(cfg, self.plan.steps_per_epoch, has_eval=has_eval)
        joins = self.padding_free and cfg.joins_steps(topo.world_size)
        # every row's tokens, read once: the joined passes' budget, and each step's count of them on several ranks
        self.row_tokens = lengths(self.data.train.with_format("arrow")[:]) if joins else None
        self.join_tokens = join_budget(self.row_tokens, self.plan, self.schedule.total_steps, joins)
        self.eval_chunks = eval_chunks(self.data, cfg, self.padding_free, self.join_tokens) if has_eval else []
        self.optimizer = build_optimizer(cfg, self.model.named_parameters(), topo.device)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.schedule.total_steps)
        fp16_scaler = (
            self.precision.autocast_dtype == torch.float16 and self.strategy != "deepspeed"
        )  # DeepSpeed scales its own
        self.scaler = torch.amp.GradScaler(topo.device.type, enabled=fp16_scaler)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        resume = self.resume_point()
        if resume is not None:
            self.load_checkpoint(resume)  # under DeepSpeed: into the plain model, before its engine exists
        if self.strategy == "deepspeed":
            self.engine = ds_.initialize(self, resume)
        blocker = graph_blocker(self.optimizer, self.trainable, topo.device, topo.world_size, self.scaler.is_enabled())
        self.graphed_update = (
            None if blocker else GraphedUpdate(self.optimizer, self.trainable, cfg.max_grad_norm or float("inf"))
        )
        if blocker and topo.device.type == "cuda":
            log.info("the clip and optimizer step run eagerly: %s", blocker)
        log.info(
            "training %s: %d rows, %d steps/epoch, %d steps, %s, %s, %d process(es)",
            layout_name(self.data.packed, self.padding_free, self.join_tokens),
            self.plan.num_rows,
            self.plan.steps_per_epoch,
            self.schedule.total_steps,
            self.precision.name,
            self.strategy,
            topo.world_size,
        )

    def resume_point(self) -> Path | None:
        if self.cfg.resume_from_checkpoint:
            path = Path(self.cfg.resume_from_checkpoint).expanduser()
            if ckpt.read_state(path) is None:
                raise JobSpecError(
                    f"resume_from_checkpoint {path} is not a complete ftw checkpoint",
                    hint="point it at a checkpoint-<step> folder with a valid ftw_state.json, or remove the key",
                )
            return path
        if self.cfg.auto_resume_from_checkpoints:
            return ckpt.newest_complete(self.run_dir / "checkpoints")
        return None

    # ---- one optimizer step --------------------------------------------------------------------
    def _autocast(self):
        return self.precision.autocast(self.topo.device.type)

    def _offload(self):
        """Saved activations wait in host memory (worker/train/offload.py)."""
        return self.offloader.saving() if self.offloader is not None else contextlib.nullcontext()

    def train_step(self, batch: StepInput) -> QueuedStep:
        """Queue one optimizer step on the device; its numbers come back through `record`."""
        topo = self.topo
        if topo.world_size > 1:  # the global counts, summed on the devices and read back with the step's numbers
            counts = torch.tensor(
                [batch.targets, batch.tokens], dtype=torch.float64, pin_memory=topo.device.type == "cuda"
            )
            counts = counts.to(topo.device, non_blocking=True)
            torch.distributed.all_reduce(counts)
            n_items: torch.Tensor | float = counts[0].clamp(min=1).float()
            host_counts = None
        else:  # one process: the host has them, and the loss divides by a number (no copy, no kernels)
            counts, n_items, host_counts = None, float(max(batch.targets, 1)), (batch.targets, batch.tokens)
        micro_sums = []  # each micro-batch's loss, then its metric sums
        for i, micro in enumerate(batch.micro):  # on the device already (StepBatches queued its copy)
            with dist_.no_grad_sync(self.engine, sync=i == len(batch.micro) - 1):
                with self._autocast(), self._offload():
                    loss, metric_sums = self.objective.loss(self.engine, micro, n_items)
                # DDP/FSDP/DeepSpeed average gradients over ranks; the loss is already a global mean
                ranks_loss = loss * topo.world_size if topo.world_size > 1 else loss
                if self.strategy == "deepspeed":
                    ds_.backward(self.engine, ranks_loss)
                else:
                    self.scaler.scale(ranks_loss).backward()
            micro_sums.append(torch.cat([loss.detach().double().reshape(1), metric_sums]))
        sums = micro_sums[0] if len(micro_sums) == 1 else torch.stack(micro_sums).sum(0)
        if topo.world_size > 1:
            torch.distributed.all_reduce(sums)  # every rank's share of the global mean (and metric sums)
        grad_norm = self.optimizer_step()
        lr = self.optimizer.param_groups[0]["lr"]
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = grad_norm.to(sums.device, torch.float64).reshape(1)  # on the CPU when FSDP offloads gradients
        values = [sums[:1], grad_norm, sums[1:]] + ([] if counts is None else [counts])
        return QueuedStep(batch.step + 1, lr, Readout(torch.cat(values)), host_counts)

    def optimizer_step(self) -> torch.Tensor:
        """Clip the gradients and step the optimizer (from the replayed graph where it can): their total norm,
        before clipping, on the device."""
        if self.strategy == "deepspeed":  # its step at the boundary clipped and stepped already
            return ds_.grad_norm(self.engine, self.topo.device)
        graphed = self.graphed_update
        grad_norm = graphed.replay() if graphed is not None else None
        if grad_norm is not None:
            return grad_norm
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.trainable, self.cfg.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if graphed is not None:
            graphed.capture()  # once, after the first eager step
        return grad_norm

    def record(self, queued: QueuedStep) -> None:
        """A queued step's numbers, once the device has them: loop state, progress, loss checks."""
        loss, grad_norm, *metric_sums = queued.readout.values()
        targets, tokens = queued.counts if queued.counts is not None else metric_sums[-2:]
        metric_sums = metric_sums[: len(self.objective.metric_names)]
        state = self.state
        state.tokens += int(tokens)
        state.target_tokens += int(targets)
        state.train_loss.append((queued.step, round(loss, 6)))
        step_ms = queued.readout.ms_after(self.last_mark)
        self.last_mark = queued.readout.ready or self.last_mark
        if queued.step == self.first_step:  # the job's time to first step is measured from this event
            self.progress.event(step=queued.step, event="first_step")
        extra = self.objective.metrics(metric_sums, targets)  # rewards/chosen ... (DPO family), aux_loss (MoE router)
        for name in getattr(self.objective, "plotted", ()):  # drawn in loss.png beside the loss (EBFT's CFM)
            if name in extra:
                state.curves.setdefault(name, []).append((queued.step, round(extra[name], 6)))
        self.progress.step(
            queued.step,
            state.tokens - self.tokens0,
            {
                "loss": loss,
                "lr": queued.lr,
                "grad_norm": grad_norm,
                "tokens": state.tokens,  # trained so far (a resumed run's earlier ones included): exact rates
                **({} if step_ms is None else {"step_ms": round(step_ms, 2)}),
                **extra,
            },
        )
        self.loss_guard.check(queued.step, loss)

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to the end (EXIT_OK) or until SIGTERM, after saving (EXIT_PREEMPTED)."""
        sched, state, topo = self.schedule, self.state, self.topo
        self.progress = progress = Progress(
            self.cfg, self.run_dir, sched.total_steps, state.step, topo.is_main, topo.device
        )
        self.t0, self.tokens0 = time.monotonic(), state.tokens  # this process's share, for tokens/s
        self.loss_guard = LossGuard(self.cfg)
        self.first_step = state.step + 1  # this run's first optimizer step (after a resume too)
        progress.event(step=state.step, event="start", resumed_from=self.resumed_from)
        if topo.device.type == "cuda":  # from here the allocator's peak is the steps' own (loading's is kept)
            self.setup_peak_bytes = torch.cuda.max_memory_allocated(topo.device)
            torch.cuda.reset_peak_memory_stats(topo.device)
        due = range(state.step, sched.total_steps)
        profiler = StepProfiler(self.run_dir, due, None if topo.is_main else "")  # rank 0 profiles
        batches = StepBatches(
            self.data.train,
            self.plan,
            topo.rank,
            self.tokenizer.pad_token_id or 0,
            self.data.packed,
            due,
            topo.device,
            varlen="varlen_attention" in self.kernels,
            count=self.objective.count,
            target_rows=self.objective.target_rows,
            flatten=self.padding_free,
            pad_to=self.cfg.sequence_len if self.cfg.pad_to_sequence_len and not self.data.packed else None,
            join_tokens=self.join_tokens,
            sizes=self.row_tokens,
        )
        queued: deque[QueuedStep] = deque()  # steps whose numbers are still on their way
        freeze_heap()
        self.last_mark = device_mark(topo.device)  # each step's time on the GPU runs from the previous one's end
        try:
            while state.step < sched.total_steps:
                profiler.before_step(state.step)
                try:
                    queued.append(self.train_step(batches.get(state.step)))
                except torch.cuda.OutOfMemoryError as e:
                    raise OutOfMemory(
                        f"out of GPU memory at step {state.step + 1} "
                        f"({peak_memory_gib(self.topo.device, self.setup_peak_bytes)[0]:.1f} GiB in use at the peak)",
                        hint=oom_hint(os.environ),
                    ) from e
                state.step += 1
                profiler.after_step(state.step)
                while queued and (len(queued) > STEPS_AHEAD or queued[0].readout.done()):
                    self.record(queued.popleft())  # finished on the device, read while later steps run
                preempted = self.preempted()
                eval_due = sched.eval_due(state.step)
                if not (preempted or eval_due or sched.save_due(state.step) or state.step == sched.total_steps):
                    continue
                while queued:  # eval, checkpoints and stopping see this step's numbers
                    self.record(queued.popleft())
                stop_early = eval_due and self.evaluate_and_track()
                saved = sched.save_due(state.step) or (sched.save_best and state.bad_evals == 0 and eval_due)
                if saved:
                    self.save_checkpoint()
                if preempted:
                    if not saved:
                        self.save_checkpoint()
                    progress.event(step=state.step, event="preempted")
                    log.warning("SIGTERM: checkpoint-%d saved, stopping (exit %d)", state.step, EXIT_PREEMPTED)
                    return EXIT_PREEMPTED
                if stop_early:
                    log.info(
                        "early stopping at step %d: eval loss did not improve %d times", state.step, state.bad_evals
                    )
                    break
            if self.data.eval is not None and (not state.eval_loss or state.eval_loss[-1][0] != state.step):
                self.evaluate_and_track()
            self.runtime_s = time.monotonic() - self.t0
            self.tokens_this_run = state.tokens - self.tokens0
            return EXIT_OK
        finally:
            gc.unfreeze()  # what the loop kept out of the collector's view is collectable again
            profiler.close()
            batches.close()
            progress.close()
            self.objective.close()  # GRPO's vLLM engine stops before the adapter is saved and merged

    def preempted(self) -> bool:
        (flag,) = dist_.all_sum([1.0 if self.stop_requested else 0.0], self.topo)
        return flag > 0

    # ---- eval ----------------------------------------------------------------------------------
    def evaluate_and_track(self) -> bool:
        """Evaluate, record, step a plateau scheduler; True when early stopping says stop."""
        loss, metrics = evaluate(
            self.engine,
            self.objective,
            self.data,
            self.tokenizer.pad_token_id or 0,
            self.topo,
            self._autocast,
            self.eval_chunks,
            flatten=self.padding_free,
            varlen="varlen_attention" in self.kernels,
        )
        state = self.state
        state.eval_loss.append((state.step, round(loss, 6)))
        self.progress.eval(state.step, loss, metrics)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(loss)
        if state.best_eval is None or loss < state.best_eval:
            state.best_eval, state.bad_evals = loss, 0
        else:
            state.bad_evals += 1
        return self.cfg.early_stopping_patience is not None and state.bad_evals >= self.cfg.early_stopping_patience

    # ---- checkpoints ---------------------------------------------------------------------------
    def gathered_weights(self, with_optimizer: bool) -> GatheredWeights:
        """Trainable weights (and optimizer state) whole on every rank's CPU: a collective."""
        if self.strategy == "deepspeed":  # its optimizer state is saved by DeepSpeed, partitioned (ckpt.save)
            return GatheredWeights(ds_.trainable_state_dict(self), None)
        return ckpt.gathered(self.model, self.optimizer if with_optimizer else None, self.cfg.is_full_finetune())

    def checkpoint_objects(self) -> TrainingObjects:
        """What a checkpoint is written from and loaded into (under DeepSpeed, before its engine exists too)."""

        def save_partitions(folder: Path) -> None:
            ds_.save_state(self, folder)

        partitions = save_partitions if self.strategy == "deepspeed" else None
        return TrainingObjects(self.model, self.tokenizer, self.optimizer, self.scheduler, self.scaler, partitions)

    def save_checkpoint(self) -> Path | None:
        cfg, state = self.cfg, self.state
        weights = self.gathered_weights(with_optimizer=not cfg.save_only_model)
        record = CheckpointState(state, state.step / self.plan.steps_per_epoch, self.topo.world_size)
        mark_best = self.schedule.save_best and state.bad_evals == 0
        root = self.run_dir / "checkpoints"
        final = ckpt.save(root, self.checkpoint_objects(), record, weights, cfg, self.topo, mark_best)
        if final is not None:
            self.progress.event(step=state.step, event="checkpoint", path=str(final))
        return final

    def load_checkpoint(self, path: Path) -> None:
        self.state = ckpt.load(path, self.checkpoint_objects(), self.cfg, self.topo).loop
        self.resumed_from = path.name
        log.info("resumed from %s at step %d", path, self.state.step)

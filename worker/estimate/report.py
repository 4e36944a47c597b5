"""One config's estimate on every GPU type: peak memory, tokens/s, whole-run time and cost, whether
it fits, the cheapest type that fits, and what to change where it does not fit.

    est = estimate(cfg, env)                  # Estimate: the workload, steps, per-GPU rows
    est.as_json()                             # {"gpus": [...], "cheapest": NAME}
    advice(est.workload, memory, tflops)      # each change that lowers the peak, judged on one GPU

Whole-run time = startup (STARTUP_S + loading the weights + preprocessing when no prepared cache
holds the data) + optimizer steps × micro-batches a step × seconds a micro-batch. The steps are
max_steps, or the data's packed bins (tokens / bin capacity) or rows, × num_epochs. Cost = time
(rounded up to a second, as RunPod bills) × the GPU type's price per second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.config import TrainingConfig
from schemas.optimizers import OPTIMIZERS
from worker.estimate.data_tokens import DatasetSize, dataset_size
from worker.estimate.devices import CONTEXT_HEADROOM
from worker.estimate.gpus import GpuType, gpu_table
from worker.estimate.model import (
    PACKED_FILL,
    GiB,
    Workload,
    host_bound,
    host_seconds,
    more_tokens_advice,
    peak_bytes,
    step_seconds,
    tokens_per_s,
)
from worker.estimate.shapes import LINEAR_MODULES, ModelShape, adapter_params, lora_param_count, resolve_shape

STARTUP_S = 45.0  # imports, tokenizer and model set-up, first step's kernel compilation (H200 job, docs/benchmarks.md)
LOAD_BYTES_PER_S = 1 << 30  # reading (or downloading) the base model's weights; not calibrated
PREPROCESS_TOKENS_PER_S = 100_000  # ftw's tokenise + pack (bench/preprocess.py: 57-130k on 2 loaded cores)


@dataclass(frozen=True)
class GpuEstimate:
    gpu: GpuType
    peak_bytes: int
    tokens_per_s: float
    time_s: float | None
    cost_usd: float | None

    @property
    def fits(self) -> bool:
        return fits_in(self.peak_bytes, self.gpu.memory_gib * GiB)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.gpu.name,
            "memory_gib": self.gpu.memory_gib,
            "fits": self.fits,
            "peak_memory_gib": round(self.peak_bytes / GiB, 2),
            "tokens_per_s": round(self.tokens_per_s),
            "time_s": None if self.time_s is None else round(self.time_s),
            "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 4),
        }


@dataclass(frozen=True)
class Advice:
    """One change to the config and what it does on the GPU it is given for."""

    change: str
    peak_bytes: int
    speed_ratio: float  # tokens/s after the change / before
    fits: bool
    workload: Workload


@dataclass
class Estimate:
    workload: Workload
    steps: int | None
    data: DatasetSize
    startup_s: float
    rows: list[GpuEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cheapest(self) -> GpuEstimate | None:
        """The cheapest type that fits: lowest whole-run cost, or price per token when the run's length is unknown."""
        fitting = [r for r in self.rows if r.fits]
        if not fitting:
            return None
        return min(
            fitting,
            key=lambda r: (r.cost_usd if r.cost_usd is not None else r.gpu.usd_per_s / r.tokens_per_s, r.gpu.usd_per_s),
        )

    def time_and_cost(self, w: Workload, gpu: GpuType) -> tuple[float | None, float | None]:
        """Whole-run seconds and dollars of workload `w` (this run or a changed one) on `gpu`."""
        if self.steps is None:
            return None, None
        seconds = self.startup_s + self.steps * step_seconds(w, gpu.bf16_tflops)
        return seconds, math.ceil(seconds) * gpu.usd_per_s

    def as_json(self) -> dict[str, Any]:
        cheapest = self.cheapest
        return {"gpus": [r.as_json() for r in self.rows], "cheapest": cheapest.gpu.name if cheapest else None}


def fits_in(peak: int, memory_bytes: float) -> bool:
    """The peak plus the CUDA context (worker/estimate/devices.py) within the memory."""
    return peak + CONTEXT_HEADROOM <= memory_bytes


# ---- from a config to a workload -------------------------------------------------------------
def workload_of(cfg: TrainingConfig, shape: ModelShape, data: DatasetSize, gpu_count: int = 1) -> Workload:
    """What one micro-batch of `cfg` costs on each of `gpu_count` GPUs: FSDP / ZeRO-3 split the weights over them."""
    sharded = bool(
        cfg.fsdp or cfg.fsdp_config or (isinstance(cfg.deepspeed, str) and cfg.deepspeed.startswith("zero3"))
    )
    method = (
        "full"
        if cfg.is_full_finetune()
        else "qlora"
        if cfg.load_in_4bit or cfg.adapter == "qlora"
        else "lora8"
        if cfg.load_in_8bit
        else "lora"
    )
    mbs, accum = cfg.batch_shape()
    packed = cfg.sample_packing
    # the trainer's rule (worker/train/batches.padding_free), with the kernels' varlen attention taken as applied
    padding_free = cfg.joins_samples() and cfg.use_kernels is not False and cfg.attention_replaceable()
    micro_tokens = None
    if data.tokens and data.samples:
        micros = micro_batches_per_epoch(cfg, data)
        micro_tokens = data.tokens / micros if micros else None
        if packed and micro_tokens:
            micro_tokens = min(micro_tokens, mbs * cfg.sequence_len * PACKED_FILL)
    return Workload(
        shape=shape,
        method=method,
        kernels=cfg.use_kernels is not False,
        micro_batch_size=mbs,
        sequence_len=cfg.sequence_len,
        packed=packed,
        grad_accum=accum,
        checkpointing=bool(cfg.gradient_checkpointing),
        offload=bool(cfg.activation_offloading) or cfg.gradient_checkpointing == "offload",
        lora_params=0 if method == "full" else adapter_params(cfg, shape),
        mean_sample_tokens=data.mean_sample_tokens,
        micro_tokens=micro_tokens,
        data_tokens=data.tokens if packed and data.tokens else None,
        fp8_base=cfg.fp8_base_weights,
        lora_fused=not cfg.lora_unfused_by(),
        mlp_fused=cfg.lora_mlp_kernel is not False,
        dropout=method != "full" and cfg.lora_dropout > 0,
        joined=padding_free and cfg.joins_steps(max(gpu_count, 1)),  # the trainer's rule
        shards=max(gpu_count, 1) if sharded else 1,
        ranks=max(gpu_count, 1),
        moment_bits=optimizer.moment_bits if (optimizer := OPTIMIZERS.get(cfg.optimizer)) else None,
        trained_share=data.trained_share if cfg.rl_method() is None else None,  # the rl losses take every row
        padding_free=padding_free,
    )


def micro_batches_per_epoch(cfg: TrainingConfig, data: DatasetSize) -> int:
    """Packed: one bin of micro_batch_size × sequence_len tokens each; else micro_batch_size rows
    (rows of unknown length taken as half a sequence, as the workload takes them)."""
    mbs = cfg.batch_shape()[0]
    if cfg.sample_packing:
        return max(1, math.ceil((data.tokens or 0) / (mbs * cfg.sequence_len * PACKED_FILL)))
    samples = data.samples or (data.tokens or 0) / (cfg.sequence_len / 2)
    return max(1, math.ceil(samples / mbs))


def total_steps(cfg: TrainingConfig, data: DatasetSize) -> int | None:
    if cfg.max_steps:
        return cfg.max_steps
    if not data.tokens:
        return None
    per_epoch = math.ceil(micro_batches_per_epoch(cfg, data) / cfg.batch_shape()[1])
    return max(1, math.ceil(per_epoch * cfg.num_epochs))


# ---- the estimate ----------------------------------------------------------------------------
def estimate(
    cfg: TrainingConfig,
    env: Mapping[str, str],
    gpu_name: str | None = None,
    shape: ModelShape | None = None,
    tokens: int | None = None,
) -> Estimate:
    """`shape`/`tokens` override what the config's model and data say (e.g. `--tokens`)."""
    shape = shape or resolve_shape(cfg.base_model, cfg.revision_of_model, env)
    data = DatasetSize(tokens, None, "given") if tokens else dataset_size(cfg, env)
    w = workload_of(cfg, shape, data)
    steps = total_steps(cfg, data)
    preprocess = 0.0 if "prepared cache" in data.source or not data.tokens else data.tokens / PREPROCESS_TOKENS_PER_S
    est = Estimate(
        w, steps, data, STARTUP_S + shape.bytes_on_disk / LOAD_BYTES_PER_S + preprocess, notes=list(data.notes)
    )
    table = gpu_table()
    gpus = table.gpus
    if gpu_name:
        found = table.find(gpu_name)
        if found is None:
            raise ValueError(
                f"unknown GPU type {gpu_name!r}; RunPod's serverless types are: {', '.join(g.name for g in table.gpus)}"
            )
        gpus = (found,)
    peak = peak_bytes(w)
    for gpu in gpus:
        time_s, cost = est.time_and_cost(w, gpu)
        est.rows.append(GpuEstimate(gpu, peak, tokens_per_s(w, gpu.bf16_tflops), time_s, cost))
    if steps is None:
        est.notes.append(
            "the run's length is unknown (no max_steps, and the data's size is unknown here): time and cost are not "
            "given; set max_steps or pass --tokens N"
        )
    bound = [gpu.name for gpu in gpus if host_bound(w, gpu.bf16_tflops)]
    if bound:
        where = ", ".join(bound[:3]) + (f" and {len(bound) - 3} more" if len(bound) > 3 else "")
        est.notes.append(
            f"the host sets the pace on {where}: a micro-batch's GPU work there is shorter than the "
            f"~{host_seconds(w) * 1e3:.0f} ms the host takes to launch it, so the GPU waits; more tokens a micro-batch "
            f"({more_tokens_advice(w.packed)}) train in the same host time"
            + (
                "; on H100s such short padding-free passes of ftw train ran 1.2-1.8x slower than this, and on two "
                "H200 machines from 1.3-1.7x faster to 1.2x slower: the host's CPU sets the floor, not the GPU "
                "(docs/estimate.md, what is not calibrated)"
                if w.padding_free
                else ""
            )
        )
    if w.mode == "hf" and w.method == "full":
        est.notes.append(
            "full fine-tuning is not calibrated (no measured row): its figures come from the kernels-off LoRA rows"
        )
    return est


# ---- advice ----------------------------------------------------------------------------------
def changes(w: Workload) -> list[tuple[str, Workload]]:
    """The config changes that lower the peak, each as (what to set, the changed workload)."""
    out = []
    if w.mode == "peft_lora":  # PEFT's layers keep more than the fused ones
        out.append(
            (
                "the fused LoRA kernels (peft_use_dora: false, lora_bias: none)",
                w.replace(lora_fused=True),
            )
        )
    if not w.checkpointing:
        out.append(("gradient_checkpointing: true", w.replace(checkpointing=True)))
    if not (w.checkpointing and w.offload):
        out.append(
            (
                "gradient_checkpointing: offload (layer inputs wait in host memory)",
                w.replace(checkpointing=True, offload=True),
            )
        )
    if w.method == "lora":  # ftw's QLoRA keeps more activations than its fused LoRA: alone it can cost memory
        out.append(("adapter: qlora, load_in_4bit: true", w.replace(method="qlora")))
        if not w.checkpointing:
            out.append(
                (
                    "adapter: qlora, load_in_4bit: true, gradient_checkpointing: true",
                    w.replace(method="qlora", checkpointing=True),
                )
            )
    if w.method == "full":
        out.append(
            (
                "adapter: lora, lora_r: 16, lora_target_linear: true",
                w.replace(method="lora", lora_params=lora_all_linear(w)),
            )
        )
    if w.micro_batch_size > 1:
        half = w.micro_batch_size // 2
        out.append(
            (
                f"micro_batch_size: {half}, gradient_accumulation_steps: {w.grad_accum * w.micro_batch_size // half} "
                "(same batch)",
                smaller_batch(w, half),
            )
        )
    if w.micro_batch_size > 2:
        out.append(
            (
                f"micro_batch_size: 1, gradient_accumulation_steps: {w.grad_accum * w.micro_batch_size} (same batch)",
                smaller_batch(w, 1),
            )
        )
    return out


def lora_all_linear(w: Workload) -> int:
    return lora_param_count(w.shape, 16, LINEAR_MODULES)


def smaller_batch(w: Workload, mbs: int) -> Workload:
    micro = None if w.micro_tokens is None else w.micro_tokens * mbs / w.micro_batch_size
    return w.replace(micro_batch_size=mbs, grad_accum=w.grad_accum * w.micro_batch_size // mbs, micro_tokens=micro)


def advice(w: Workload, memory_bytes: float, bf16_tflops: float) -> list[Advice]:
    """Each change alone, then all of them together when none alone is enough."""
    speed = tokens_per_s(w, bf16_tflops)

    def judged(text: str, changed: Workload) -> Advice:
        peak = peak_bytes(changed)
        return Advice(text, peak, tokens_per_s(changed, bf16_tflops) / speed, fits_in(peak, memory_bytes), changed)

    out = [judged(text, changed) for text, changed in changes(w)]
    adapter = "qlora" if w.method in ("lora", "full") else w.method
    everything = smaller_batch(
        w.replace(checkpointing=True, offload=True, method=adapter, lora_params=w.lora_params or lora_all_linear(w)), 1
    )
    if out and not any(a.fits for a in out) and everything != w:
        out.append(judged("all together: QLoRA, gradient_checkpointing: offload, micro_batch_size: 1", everything))
    return out

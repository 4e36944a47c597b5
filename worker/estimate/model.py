"""Peak GPU memory and tokens/s of one training run, from the model's shape and the config alone.

The model (docs/estimate.md derives it; bench/estimate_check.py prints it against every H200 row
of docs/benchmarks.md):

    peak  = weights + trainable state + activations + logits + OVERHEAD
    step  = FLOPs per micro-batch / (bf16 peak × efficiency(hidden)) + host time per micro-batch

Activations are bytes per token per layer, a·hidden + b·intermediate (bf16), for the kernel path
the run takes (MODES); with gradient checkpointing only each layer's input is kept (or none, when
it is offloaded to host memory) plus a share of one layer's activations during its recompute.
Efficiency is the fraction of the GPU's bf16 peak the step's useful FLOPs reach; it grows with the
hidden size (bigger matmuls), e_max·h/(h + h0). The coefficients are fitted to the H200 rows; other
GPUs get the same efficiency against their own datasheet peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from worker.estimate.shapes import ModelShape

GiB = 1 << 30
Method = Literal["lora", "qlora", "lora8", "full"]


@dataclass(frozen=True)
class Mode:
    """Calibration of one kernel path: activation bytes, logits bytes, matmul efficiency."""

    act_hidden: float  # bf16 tensors of width `hidden` kept per token per layer
    act_intermediate: float  # bf16 tensors of width `intermediate` kept per token per layer
    logits_bytes: float  # bytes per token per vocabulary entry at the peak
    e_max: float
    h0: float
    host_synced: bool = False  # the step waits for the host even in a bare loop
    logits_cap: float | None = None  # the loss head's chunked logits: at most one chunk alive (bytes)
    recompute_skips_down: bool = False  # a checkpointed layer's recompute runs no down projection (fused MLP)

    def efficiency(self, hidden: int) -> float:
        return self.e_max * hidden / (hidden + self.h0)


FUSED_CE_CHUNK_BYTES = float(1 << 30)
# LoRA over a bf16 base with ftw's kernels (fused LoRA MLP/QKV/O, varlen attention, fused CE)
# (the fused cross-entropy computes 1 GiB of bf16 logits at a time and frees each chunk before the next:
# FUSED_CE_CHUNK_BYTES, kernels/ftw_kernels/cross_entropy.CHUNK_LOGITS_BYTES; a checkpointed layer's
# recompute stops before the down projection: kernels/ftw_kernels/patches.py `_checkpoint_pass`)
FUSED = Mode(
    act_hidden=8.0,
    act_intermediate=2.0,
    logits_bytes=2.0,
    e_max=0.642,
    h0=1011,
    logits_cap=FUSED_CE_CHUNK_BYTES,
    recompute_skips_down=True,
)
# kernels off (use_kernels: false): transformers + peft with sdpa, which builds the packed rows'
# mask on the host every forward; also full fine-tuning (not calibrated: no measured row)
HF = Mode(act_hidden=20.3, act_intermediate=5.2, logits_bytes=11.2, e_max=0.46, h0=2731, host_synced=True)
MODES = {
    "fused": FUSED,
    "hf": HF,
    # kernels on, but the adapter off the fused LoRA ones (DoRA, a trained bias:
    # TrainingConfig.lora_unfused_by): PEFT's LoRA layers beside the kernels' norms, attention, SwiGLU and loss head.
    # Not calibrated (no measured row). Activations counted from what autograd keeps a layer with lora_dropout (an
    # upper bound without): the fused path's
    # tensors plus, per LoRA projection, its dropped-out input (bf16) and dropout mask (1 byte): q, k, v, o, gate and
    # up over hidden-wide inputs (+7 hidden-wide), down over the intermediate (+1.5, and h kept apart from the SwiGLU:
    # +1); the matmul efficiency of the kernels-off path, without its host sync
    "peft_lora": dataclasses.replace(
        FUSED,
        act_hidden=FUSED.act_hidden + 7,
        act_intermediate=FUSED.act_intermediate + 2.5,
        e_max=HF.e_max,
        h0=HF.h0,
        recompute_skips_down=False,
    ),
}
MEMORY_TOLERANCE, SPEED_TOLERANCE = 0.15, 0.20  # the model's stated error on the measured rows (tests hold it)
OVERHEAD_BYTES = GiB // 8  # CUDA workspaces, allocator slack, the step's small buffers
CKPT_LAYER_SHARE = 0.5  # of one layer's activations alive while it is recomputed
# host time per micro-batch the GPU waits on in a loop that syncs every forward (the hf mode's mask
# checks); ftw's real path overlaps its host work with the GPU's since 2026-12-02 (docs/benchmarks.md)
HOST_S_PER_MICRO = 0.045
# what the host takes to launch a decoder layer's forward and backward on the kernels' paths (Triton and cuBLAS
# launches, autograd, Python), which overlaps the GPU's work: a micro-batch of few tokens waits for it. Fitted on the
# unpacked short steps of docs/benchmarks.md's eleventh session (H100 hosts: 5.7 ms a layer at 1B, 4.9–6.9 at 8B)
HOST_S_PER_LAYER = 0.0058
# lora_dropout on the fused path: the masks drawn inside the SwiGLU and rank-r kernels, and the elementwise passes
# over the other projections' inputs. Its 8B step on one H100, two calls back to back (docs/benchmarks.md, "2026-12-06,
# ninth session" calls 1 and 2: 492.6 and 497.5 ms with lora_dropout 0.05, 473.5 and 474.2 without): 1.045×
DROPOUT_STEP = 1.045
# a joined pass's tokens over micro_batch_size × sequence_len: the run's largest micro-batch (the budget) is near it
# where samples have a long tail, and next-fit fills ~70% of the budget (bench/joined_passes.py over lognormal samples:
# 0.53-0.77 for mbs 1-4 × 4-8 accumulated; the passes it gives are within ±20% of that bench's exact counts)
JOIN_FILL = 0.65
# ranks joining their shares of a step run in lockstep, as many passes as the rank needing most
# (worker/train/batches.ranks_passes): a rank's passes spread by about LOCKSTEP_SPREAD × passes / √(samples a step)
# for the lognormal mix of SPAN_PER_MEAN, and the most of N ranks' lies that spread × E[max of N normals] above the
# mean (bench/joined_passes.py --ranks 2, 4, 8: within ±20% of its exact counts at mbs 1-4 × 4-8 accumulated)
LOCKSTEP_SPREAD = 0.75
HOST_FORWARD_SHARE = 0.43  # of that host work, the forward's (the same profile): a checkpointed step runs it twice
BYTES_4BIT = 0.53  # nf4 + absmax (double-quantised) per quantised weight
HOST_LINK_BYTES_PER_S = 25e9  # a typical pinned copy rate over PCIe 4 x16 (not calibrated)
H200_TFLOPS = 989.4
PACKED_FILL = 0.99  # share of a packed bin holding tokens (ftw's FFD packer: 99.9% measured)
SPAN_PER_MEAN = 1.9  # Σs²/Σs over mean sample length for a lognormal σ=0.8 length mix


@dataclass(frozen=True)
class Workload:
    """What one micro-batch of this run costs: the shape and the config's choices that matter."""

    shape: ModelShape
    method: Method
    kernels: bool
    micro_batch_size: int
    sequence_len: int
    packed: bool
    grad_accum: int = 1
    checkpointing: bool = False
    offload: bool = False
    lora_params: int = 0
    mean_sample_tokens: float | None = None  # None: unknown (taken as half the sequence)
    micro_tokens: float | None = None  # real tokens of an average micro-batch, when the data says
    data_tokens: int | None = None  # packed: all the data's tokens (a bin never holds more)
    shards: int = 1  # FSDP / ZeRO-3: weights and optimizer state split over this many GPUs
    fp8_base: bool = False  # fp8_base_weights: the decoder layers' Linears stored as float8 (1 byte a weight)
    moment_bits: int | None = None  # the optimizer keeps its moments in this many bits (None: the parameter's)
    trained_share: float | None = None  # tokens with a label / all, when the prepared data says (None: all)
    padding_free: bool = False  # unpacked rows joined into one row a micro-batch (worker/train/batches.padding_free)
    lora_fused: bool = True  # no LoRA key keeps an adapter off the fused kernels (TrainingConfig.lora_unfused_by)
    mlp_fused: bool = True  # the fused LoRA MLP runs where the mode's kernels do (lora_mlp_kernel not false)
    dropout: bool = False  # lora_dropout > 0: on the fused path its masks' passes lengthen the GPU's step
    joined: bool = False  # a padding-free step's samples join across its micro-batches (worker/train/batches.joined)
    ranks: int = 1  # processes a step is shared over (DDP, FSDP): joined, they run as many passes as the most needs

    @property
    def mode(self) -> str:
        if not self.kernels or self.method == "full":
            return "hf"
        return "fused" if self.lora_fused else "peft_lora"  # a 4-bit or 8-bit base runs the fused path too

    @property
    def peak_tokens(self) -> int:
        """Tokens of the largest micro-batch (a full packed bin; or mbs rows of the longest samples)."""
        full = self.micro_batch_size * self.sequence_len
        return full if self.data_tokens is None else min(full, self.data_tokens)

    @property
    def sample_tokens(self) -> float:
        return min(float(self.sequence_len), self.mean_sample_tokens or self.sequence_len / 2)

    @property
    def attention_span(self) -> float:
        """Σ s² / Σ s over the samples: how many earlier tokens a token attends to, times two."""
        return min(float(self.sequence_len), SPAN_PER_MEAN * self.sample_tokens)

    @property
    def real_tokens(self) -> float:
        """Tokens that count (not padding) in an average micro-batch."""
        if self.micro_tokens is not None:
            return self.micro_tokens
        return self.peak_tokens * PACKED_FILL if self.packed else self.micro_batch_size * self.sample_tokens

    @property
    def compute_tokens(self) -> float:
        """Tokens the GPU computes on in an average micro-batch: a packed bin, or a padding-free micro-batch, as it
        is; unpacked rows padded to the longest of the micro-batch (taken as the attention span)."""
        if self.packed or self.padding_free:
            return self.real_tokens
        return self.micro_batch_size * self.attention_span

    @property
    def passes(self) -> float:
        """Forward and backward passes a step: one a micro-batch, or, where the step's samples join, as many as hold
        its tokens at JOIN_FILL of micro_batch_size × sequence_len each (never more than its micro-batches); over
        several ranks, the most any of them needs (LOCKSTEP_SPREAD)."""
        if not self.joined:
            return float(self.grad_accum)
        pass_tokens = JOIN_FILL * self.micro_batch_size * self.sequence_len
        mean = max(1.0, self.grad_accum * self.real_tokens / pass_tokens)
        spread = LOCKSTEP_SPREAD * mean / (self.grad_accum * self.micro_batch_size) ** 0.5
        return min(float(self.grad_accum), mean + spread * expected_max_normal(self.ranks))

    def replace(self, **changes) -> Workload:
        return dataclasses.replace(self, **changes)


def expected_max_normal(n: int) -> float:
    """E[max] of n ≥ 1 standard normal draws (Blom's approximation: 0 for one, 0.59 for two, 1.43 for eight)."""
    return NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


# ---- memory ----------------------------------------------------------------------------------
def trainable_state_bytes(w: Workload) -> float:
    """Bytes each trainable parameter carries besides its frozen weight: full fine-tuning a bf16 grad and
    AdamW's two moments (bf16); an adapter an fp32 weight, fp32 grad, two fp32 moments and a bf16 copy.
    A low-bit optimizer keeps the moments in `moment_bits` instead."""
    full = w.method == "full"
    moment = (2 if full else 4) if w.moment_bits is None else w.moment_bits / 8
    return 2 + 2 * moment if full else 4 + 4 + 2 * moment + 2


def memory_parts(w: Workload) -> dict[str, int]:
    """Bytes of each part of the peak, on one GPU."""
    s, mode = w.shape, MODES[w.mode]
    dense = s.params - s.linear_params
    # a bf16 4-bit or 8-bit base is only frozen (worker/train/adapters.prepare_quantized): the rest stays bf16
    if w.method == "qlora":
        weights = s.linear_params * BYTES_4BIT + dense * 2
    elif w.method == "lora8":
        weights = s.linear_params * 1.0 + dense * 2
    elif w.fp8_base:
        weights = s.linear_params * 1 + dense * 2
    else:
        weights = s.params * 2
    state = (s.params if w.method == "full" else w.lora_params) * trainable_state_bytes(w)
    per_token_layer = 2 * (mode.act_hidden * s.hidden + mode.act_intermediate * active_intermediate(s))
    tokens = w.peak_tokens
    if w.checkpointing:
        kept = 0 if w.offload else tokens * s.layers * s.hidden * 2
        activations = kept + CKPT_LAYER_SHARE * tokens * per_token_layer
    elif w.offload:  # every saved activation goes to host memory but the last ones backward needs first
        activations = CKPT_LAYER_SHARE * tokens * per_token_layer
    else:
        activations = tokens * s.layers * per_token_layer
    return {
        "weights": int(weights / w.shards),
        "trainable_state": int(state / w.shards),
        "activations": int(activations),
        "logits": int(min(tokens * s.vocab * mode.logits_bytes, mode.logits_cap or float("inf"))),
        "overhead": OVERHEAD_BYTES,
    }


def peak_bytes(w: Workload) -> int:
    """The training step's peak, or loading's where that is higher (a float8 base loads as bf16 first)."""
    return max(sum(memory_parts(w).values()), weight_bytes(w) + OVERHEAD_BYTES)


def weight_bytes(w: Workload) -> int:
    """What loading the weights needs: `fp8_base_weights` over a bf16 base loads bf16 and converts it on the GPU
    afterwards."""
    bf16_first = w.fp8_base and w.method != "qlora"  # a 4-bit base loads quantised and stays so
    return int(w.shape.params * 2 / w.shards) if bf16_first else memory_parts(w)["weights"]


def active_intermediate(s: ModelShape) -> int:
    return s.expert_intermediate * s.experts_per_token if s.experts > 1 else s.intermediate


# ---- speed -----------------------------------------------------------------------------------
def flops_per_token(w: Workload) -> float:
    """Useful FLOPs per computed token: frozen matmuls forward + input-gradient, LoRA (or all
    weights, full) forward + both gradients, causal attention; a recompute forward with checkpointing."""
    s = w.shape
    frozen = s.active_linear_params + s.vocab * s.hidden * head_share(w)
    if w.method == "full":
        flops = 6 * frozen + attention_flops_per_token(w)
    else:
        flops = 4 * frozen + 6 * w.lora_params + attention_flops_per_token(w)
    return flops + (recompute_flops_per_token(w) if w.checkpointing else 0)


def recompute_flops_per_token(w: Workload) -> float:
    """What a checkpointed step runs again in its backward: each decoder layer's forward (the output head is not in
    a layer), less the down projection where the fused MLP skips it (nothing reads a recomputed layer's output),
    and the adapters' forward. Either kind of checkpointing runs the same FLOPs."""
    s = w.shape
    linear = s.active_linear_params
    if MODES[w.mode].recompute_skips_down and w.mlp_fused and s.experts <= 1:
        linear -= s.layers * s.hidden * s.intermediate
    adapters = 0 if w.method == "full" else 2 * w.lora_params
    return 2 * linear + adapters + attention_flops_per_token(w) / 3


def attention_flops_per_token(w: Workload) -> float:
    """Causal attention forward and backward: QKᵀ and PV over half the span, three passes' worth."""
    return 6 * w.shape.layers * w.shape.q_dim * w.attention_span / 2


def head_share(w: Workload) -> float:
    """The share of a batch's tokens the output head computes logits for: ftw's fused loss only the tokens that have
    a label (kernels/ftw_kernels/cross_entropy.py `target_rows`), transformers' every token."""
    return w.trained_share if w.kernels and w.trained_share is not None else 1.0


def gpu_seconds(w: Workload, bf16_tflops: float = H200_TFLOPS) -> float:
    """The GPU's own time for one micro-batch."""
    gpu = w.compute_tokens * flops_per_token(w) / (bf16_tflops * 1e12 * MODES[w.mode].efficiency(w.shape.hidden))
    if w.dropout and w.mode == "fused":  # the one path its cost was measured on (the others: not priced)
        gpu *= DROPOUT_STEP
    if w.offload and not w.checkpointing:  # every activation crosses PCIe twice; the copies overlap compute
        per_token_layer = memory_parts(w)["activations"] / CKPT_LAYER_SHARE / w.peak_tokens
        gpu = max(gpu, 2 * w.compute_tokens * per_token_layer * w.shape.layers / HOST_LINK_BYTES_PER_S)
    return gpu


def host_seconds(w: Workload) -> float:
    """The host's time to launch one micro-batch on the kernels' paths, whatever its tokens: a step is never
    shorter. A checkpointed step launches each layer's forward again."""
    return HOST_S_PER_LAYER * w.shape.layers * (1 + HOST_FORWARD_SHARE if w.checkpointing else 1)


def more_tokens_advice(sample_packing: bool) -> str:
    """What puts more tokens in a micro-batch where the host sets the pace: the estimate's note and the job result's
    idle warning say the same."""
    if sample_packing:
        return "a larger micro_batch_size or sequence_len"
    return "a larger micro_batch_size, or sample_packing: true"


def one_pass(w: Workload) -> Workload:
    """One forward and backward pass of a step: a micro-batch, or a joined share of the step's samples."""
    if w.passes == w.grad_accum:
        return w
    return w.replace(micro_tokens=w.grad_accum * w.real_tokens / w.passes, joined=False)


def host_bound(w: Workload, bf16_tflops: float = H200_TFLOPS) -> bool:
    """Whether the host, not the GPU, sets the pace of this workload's steps on that GPU."""
    p = one_pass(w)
    return not MODES[p.mode].host_synced and gpu_seconds(p, bf16_tflops) < host_seconds(p)


def micro_batch_seconds(w: Workload, bf16_tflops: float = H200_TFLOPS) -> float:
    if MODES[w.mode].host_synced:  # the host's time adds to the GPU's
        return gpu_seconds(w, bf16_tflops) + HOST_S_PER_MICRO
    return max(gpu_seconds(w, bf16_tflops), host_seconds(w))


def step_seconds(w: Workload, bf16_tflops: float = H200_TFLOPS) -> float:
    """One optimizer step: its passes, each a micro-batch's time."""
    return w.passes * micro_batch_seconds(one_pass(w), bf16_tflops)


def tokens_per_s(w: Workload, bf16_tflops: float = H200_TFLOPS) -> float:
    return w.grad_accum * w.real_tokens / step_seconds(w, bf16_tflops)

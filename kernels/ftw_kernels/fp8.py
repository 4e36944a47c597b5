"""Frozen base weights in float8 for the fused LoRA functions (`fp8_base_weights: true`, Ada/Hopper and later).

Storage: a frozen projection weight W (N×K, out × in) becomes one float8_e4m3fn tensor Wq of the same shape
with one fp32 scale per output channel, W ≈ diag(s)·Wq (`Fp8Weight`): half the bf16 weight's bytes, plus
4·N. The two matmuls the fused functions need of it run as `torch._scaled_mm` (row-wise scales, fp32
accumulation, bf16 out):
- forward y = x·Wᵀ: x quantised per row (token) on the fly, y = (sₓ·xq)·(Wq·diag(s))ᵀ;
- backward dx = dy·W = (dy·diag(s))·Wq: the output-channel scales fold into dy before dy is quantised per
  row, so the same Wq serves. cuBLASLt's fp8 GEMM takes K-major operands only, so Wq is transposed (the
  same bytes, fp8_quant.transposed) into a transient copy for that one GEMM.
Why one copy and no second one quantised along the input channels (or a tensor-wise transposed copy):
a second quantisation would make the backward differentiate another operator than the forward ran
(rounded twice, differently), a tensor-wise scale loses the small channels next to an outlier, and
either doubles the storage to the bf16 weight's bytes. The per-backward transpose reads and writes
the fp8 weight once (~1% of an 8B step). Activations, LoRA A/B and every gradient stay bf16/fp32.
Off CUDA (the CPU tests) `matmul` runs the same maths as dequantise → matmul.
"""

from __future__ import annotations

import torch

from ftw_kernels.fp8_quant import FP8, FP8_MAX, MIN_AMAX, quantise_rows, transposed

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later
_ONES: dict[tuple[torch.device, int], torch.Tensor] = {}


class Fp8Weight(torch.nn.Parameter):
    """A frozen weight as float8_e4m3fn (N×K) and its per-output-channel fp32 scales (`scale`, 1×N)."""

    scale: torch.Tensor

    def __new__(cls, data: torch.Tensor, scale: torch.Tensor) -> Fp8Weight:
        weight = torch.Tensor._make_subclass(cls, data, False)
        weight.scale = scale
        return weight

    def __deepcopy__(self, memo: dict) -> Fp8Weight:
        return Fp8Weight(self.data.clone(), self.scale.clone())

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.float() * self.scale.t()).to(dtype)


def is_fp8(weight: torch.Tensor) -> bool:
    return isinstance(weight, Fp8Weight)


def quantise_weight(weight: torch.Tensor) -> Fp8Weight:
    """W (N×K, any float dtype) as `Fp8Weight`: per output channel, amax → the largest finite fp8."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(MIN_AMAX) / FP8_MAX
    data = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Weight(data, scale.t().contiguous())


def convertible(linear: torch.nn.Module) -> bool:
    """A Linear whose weight `_scaled_mm` takes: floating point, both dims multiples of 16."""
    w = getattr(linear, "weight", None)
    return (
        isinstance(linear, torch.nn.Linear)
        and w is not None
        and not is_fp8(w)
        and w.is_floating_point()
        and not w.requires_grad
        and w.shape[0] % 16 == 0
        and w.shape[1] % 16 == 0
    )


def convert(linear: torch.nn.Linear) -> None:
    """Replace the frozen `linear.weight` by its `Fp8Weight` (the bf16 tensor is freed)."""
    linear.weight = quantise_weight(linear.weight)


def _ones(device: torch.device, n: int) -> torch.Tensor:
    key = (device, n)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, n, dtype=torch.float32, device=device)
    return _ONES[key]


def matmul(aq: torch.Tensor, sa: torch.Tensor, bq_t: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype, fast: bool):
    """(sa·aq)·(bq_t·sb) in `dtype`: aq M×K fp8 rows, bq_t K×N fp8 column-major (a transposed N×K), sa M×1 and
    sb 1×N fp32. `torch._scaled_mm` on CUDA in bf16 (row-wise scaling writes bf16 only); dequantise → fp32 matmul
    otherwise (the CPU tests' reference; the config rules keep real runs in bf16)."""
    if aq.is_cuda and dtype == torch.bfloat16:
        return torch._scaled_mm(aq, bq_t, scale_a=sa, scale_b=sb, out_dtype=dtype, use_fast_accum=fast)
    return ((aq.float() * sa) @ (bq_t.float() * sb)).to(dtype)


def linear(x2: torch.Tensor, weight: Fp8Weight, quantised: dict | None = None) -> torch.Tensor:
    """x2·Wᵀ (x2: tokens × K in the compute dtype), x2 quantised per row: once for all the projections of
    one input when they pass the same `quantised` dict."""
    memo = {} if quantised is None else quantised
    if "x" not in memo:
        memo["x"] = quantise_rows(x2)
    xq, sx = memo["x"]
    return matmul(xq, sx, weight.t(), weight.scale, x2.dtype, fast=True)


def input_grad(dy: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """dy·W (dy: tokens × N): the weight's scales folded into dy's row quantisation, Wq transposed for the GEMM."""
    dyq, sdy = quantise_rows(dy, weight.scale)
    return matmul(dyq, sdy, transposed(weight.data).t(), _ones(dy.device, weight.shape[1]), dy.dtype, fast=False)

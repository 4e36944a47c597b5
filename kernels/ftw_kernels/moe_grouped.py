"""The experts' LoRA step on torch's grouped GEMM (`torch._grouped_mm`: CUTLASS on sm90), the other
implementation of `kernels/ftw_kernels/moe.py`'s experts function.

Same contract as the Triton `ScatterMoELoRA` (y in routing order, unweighted), other split of the
work: the tokens are gathered once into expert order, the base products x·Wₑᵀ run as one grouped
GEMM each (the library kernel transformers' `grouped_mm` uses), and the LoRA term as two rank-r
grouped GEMMs on the same sorted rows, added in place: s·(x Aₑᵀ) Bₑᵀ, never W + BA. SwiGLU is one
Triton pass over the [gate | up] rows (kernels/ftw_kernels/moe_swiglu.py). The backward takes dx and
the four LoRA gradients from grouped GEMMs too, the A/B ones as 2-D × 2-D products whose groups
split the rows (`offs` on the reduction dimension).

grouped_mm wants 16-byte aligned rows (hidden, expert width and rank multiples of 8 in bf16) and, on
CUDA, bf16 on sm90/sm100 (Hopper, Blackwell): `usable` says so; elsewhere the Triton kernel serves.
"""

from __future__ import annotations

import torch

from ftw_kernels.moe_gemm import Routing, in_compute_dtype
from ftw_kernels.moe_swiglu import swiglu_rows, swiglu_rows_backward
from ftw_kernels.precision import no_autocast


def usable(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """grouped_mm runs these operands fast: bf16 on an sm90/sm100 GPU (its CUTLASS kernel; elsewhere
    torch loops over the groups after a host sync), fp32 and bf16 on CPU; 16-byte rows."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    else:
        ok = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    size = torch.finfo(dtype).bits // 8
    return ok and all(d * size % 16 == 0 for d in dims)


def _gmm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=ends)


def _lora_linear(x, w, a, b, scale, ends) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x Wₑᵀ + s·(x Aₑᵀ) Bₑᵀ, x Aₑᵀ) over rows sorted by expert; W (E, out, in), A (E, r, in), B (E, out, r)."""
    y = _gmm(x, w.transpose(1, 2), ends)
    if a is None:
        return y, None
    xa = _gmm(x, a.transpose(1, 2), ends)
    y.add_(_gmm(xa, b.transpose(1, 2), ends), alpha=scale)
    return y, xa


def _lora_input_grad(dy, w, a, b, scale, ends) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dy W + s·(dy B) A, dy B): the input gradient of `_lora_linear`, and dy·B for dA."""
    dx = _gmm(dy, w, ends)
    if a is None:
        return dx, None
    dyb = _gmm(dy, b, ends)
    dx.add_(_gmm(dyb, a, ends), alpha=scale)
    return dx, dyb


def _factor_grad(left, right, routing: Routing, scale: float, dtype) -> torch.Tensor:
    """s·leftₑᵀ rightₑ per expert (E, P, Q): grouped over the rows; experts without rows get 0."""
    g = _gmm(left.t(), right, routing.ends)
    g.masked_fill_((routing.counts == 0)[:, None, None], 0.0)  # a group of no rows: the kernel need not write it
    return g.mul_(scale).to(dtype)


class GroupedMoELoRA(torch.autograd.Function):
    """y (routing order: token·k + j, unweighted) = down(silu(gate)·up) of each routed token."""

    @staticmethod
    def forward(ctx, x, top_k_index, w_gu, w_d, scales, a_gu, b_gu, a_d, b_d):
        # contiguous: the B's come as PEFT views with the expert dimension innermost (no grouped_mm layout)
        operands = in_compute_dtype(ctx, x, w_gu, w_d, (a_gu, b_gu, a_d, b_d), contiguous=True)
        x, w_gu, w_d, (a_gu, b_gu, a_d, b_d) = operands
        with no_autocast(x):
            routing = Routing(top_k_index, w_gu.shape[0], block_table=False)
            gu, xa_gu = _lora_linear(x.index_select(0, routing.token), w_gu, a_gu, b_gu, scales[0], routing.ends)
            y_sorted, xa_d = _lora_linear(swiglu_rows(gu), w_d, a_d, b_d, scales[1], routing.ends)
            y = torch.empty_like(y_sorted).index_copy_(0, routing.perm, y_sorted)
        ctx.save_for_backward(x, w_gu, w_d, gu, xa_gu, xa_d, a_gu, b_gu, a_d, b_d)
        ctx.routing, ctx.scales = routing, scales
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gu, w_d, gu, xa_gu, xa_d, a_gu, b_gu, a_d, b_d = ctx.saved_tensors
        routing, (s_gu, s_d), ends = ctx.routing, ctx.scales, ctx.routing.ends
        lora, lora_dtype = a_gu is not None, ctx.lora_dtype
        dy = dy.to(x.dtype).index_select(0, routing.perm)  # expert order
        dh, dyb = _lora_input_grad(dy, w_d, a_d, b_d, s_d, ends)
        h = swiglu_rows_backward(dh, gu, want_h=lora)  # gu now holds [dgate | dup]
        del dh
        grads = [None] * 4
        if lora:
            grads[2] = _factor_grad(dyb, h, routing, s_d, lora_dtype)  # dA_down
            grads[3] = _factor_grad(dy, xa_d, routing, s_d, lora_dtype)  # dB_down
        del h, dy
        dx = None
        if ctx.needs_input_grad[0] or lora:
            dx_sorted, dxa = _lora_input_grad(gu, w_gu, a_gu, b_gu, s_gu, ends)
            if lora:
                grads[0] = _factor_grad(dxa, x.index_select(0, routing.token), routing, s_gu, lora_dtype)  # dA_gate_up
                grads[1] = _factor_grad(gu, xa_gu, routing, s_gu, lora_dtype)  # dB_gate_up
            if ctx.needs_input_grad[0]:
                slot_row = torch.empty_like(routing.perm).index_copy_(
                    0, routing.perm, torch.arange(routing.rows, device=x.device)
                )
                dx = dx_sorted.index_select(0, slot_row).view(-1, routing.top_k, x.shape[1]).sum(1).to(ctx.x_dtype)
        return dx, None, None, None, None, *grads

"""RMSNorm in one pass each way: fp32 statistics, saves only the input and 1/rms per row.

y = w * x / sqrt(mean(x²) + eps). The backward gives dx always and dw only when the weight trains
(frozen in LoRA runs, so its reduction is skipped).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW, stride, n_rows, n_cols,
                 ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr, WANT_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for i in range(0, ROWS_PER_PROGRAM):
        row = first + i
        rmask = mask & (row < n_rows)
        x = tl.load(X + row * stride + cols, mask=rmask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride + cols, mask=rmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < n_rows, other=0.0)
        xhat = x * rstd
        wdy = w * dy
        dx = rstd * (wdy - xhat * (tl.sum(wdy * xhat, axis=0) / n_cols))
        tl.store(DX + row * stride + cols, dx.to(DX.dtype.element_ty), mask=rmask)
        if WANT_DW:
            dw += dy * xhat
    if WANT_DW:
        tl.store(DW + pid * n_cols + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        block = triton.next_power_of_2(n_cols)
        y = torch.empty_like(x2)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _rmsnorm_fwd[(n_rows,)](x2, weight, y, rstd, x2.stride(0), n_cols, eps, BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        want_dw = ctx.needs_input_grad[1]
        programs_wanted = torch.cuda.get_device_properties(x2.device).multi_processor_count * 4 if x2.is_cuda else 4
        # a power of two: a compile-time loop bound (few variants), and a runtime one trips the interpreter
        rows_per_program = triton.next_power_of_2(triton.cdiv(n_rows, programs_wanted))
        n_programs = triton.cdiv(n_rows, rows_per_program)
        dw_partial = torch.empty((n_programs, n_cols) if want_dw else (1,), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(n_cols)
        _rmsnorm_bwd[(n_programs,)](dy2, x2, weight, rstd, dx, dw_partial, x2.stride(0), n_rows, n_cols,
                                    ROWS_PER_PROGRAM=rows_per_program, BLOCK=block, WANT_DW=want_dw, num_warps=_num_warps(block))
        dw = dw_partial.sum(0).to(weight.dtype) if want_dw else None
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for the HF *RMSNorm modules of the patched families."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)

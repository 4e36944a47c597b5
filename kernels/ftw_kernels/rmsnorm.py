"""RMSNorm in one pass each way: fp32 statistics, saves only the input and 1/rms per row.

y = w * x / sqrt(mean(x²) + eps). The backward gives dx always and dw only when the weight trains
(frozen in LoRA runs, so its reduction is skipped). A norm with room (`ftw_kernels.bordered`) writes its
output rows with spare columns beside them, for the fused LoRA projections that read it.

`rms_norm_and_residual` serves a decoder layer's residual stream (kernels/ftw_kernels/patches.py): it hands the
stream on beside the norm's output, h = x or, given the block's output d, h = x + d written by the same kernel
(the add's separate pass and the norm's read of h saved), and the grad the stream brings back is added to dx
inside the backward's one pass instead of autograd summing x's two grads in a kernel of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.bordered import ROOM, mark, with_room
from ftw_kernels.grids import cdiv, next_power_of_2, sm_count


@triton.jit
def _rmsnorm_fwd(
    X,
    D,
    H,
    W,
    Y,
    RSTD,
    stride,
    y_stride,
    n_rows,
    n_cols,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    y_offs = rows.to(tl.int64)[:, None] * y_stride + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:  # h = x + d, rounded to h's dtype as a separate add would store it, then normalised
        h = (x + tl.load(D + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        x = h.to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)
    tl.store(Y + y_offs, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(
    DY,
    X,
    W,
    RSTD,
    DRES,
    DX,
    DW,
    stride,
    n_rows,
    n_cols,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
    WANT_DW: tl.constexpr,
    HAS_DRES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    for i in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        rows = tl.program_id(0) * ROWS_PER_PROGRAM + i + tl.arange(0, BLOCK_R)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)[:, None]
        xhat = x * rstd
        wdy = w[None, :] * dy
        dx = rstd * (wdy - xhat * (tl.sum(wdy * xhat, axis=1) / n_cols)[:, None])
        if HAS_DRES:
            dx += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if WANT_DW:
            dw += dy * xhat
    if WANT_DW:
        tl.store(DW + tl.program_id(0) * n_cols + cols, tl.sum(dw, axis=0), mask=cmask)


def _tiles(n_rows: int, n_cols: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK columns, BLOCK_R rows a tile, warps): ~4k-element tiles on the GPU (one row of a
    hidden-size norm, 32 rows of a per-head q/k norm); the interpreter pays per program, so big."""
    block = next_power_of_2(n_cols)
    block_r = max(1, min(next_power_of_2(n_rows), (4096 if on_gpu else 65536) // block))
    return block, block_r, 4 if block * block_r <= 2048 else 8 if block * block_r <= 8192 else 16


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        room: int,
        pass_residual: bool,
    ):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        d2 = None if delta is None else delta.reshape(-1, shape[-1]).contiguous()
        h2 = x2 if d2 is None else torch.empty_like(x2, dtype=torch.result_type(x2, d2))
        n_rows, n_cols = x2.shape
        block, block_r, warps = _tiles(n_rows, n_cols, x.is_cuda)
        y = with_room(n_rows, n_cols, room, h2)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _rmsnorm_fwd[(cdiv(n_rows, block_r),)](
            x2,
            x2 if d2 is None else d2,
            h2,
            weight,
            y,
            rstd,
            x2.stride(0),
            y.stride(0),
            n_rows,
            n_cols,
            eps,
            HAS_DELTA=d2 is not None,
            BLOCK_R=block_r,
            BLOCK=block,
            num_warps=warps,
        )
        ctx.save_for_backward(h2, weight, rstd)
        ctx.shape = shape
        ctx.set_materialize_grads(False)  # an unused stream's grad stays None: nothing to add
        if not pass_residual:
            return y.view(shape)
        return y.view(shape), (x if d2 is None else h2.view(shape))

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dres: torch.Tensor | None = None):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        both = ctx.needs_input_grad[1]  # x and delta get the same grad: dL/dh
        if dy is None:  # only the residual stream was used
            return dres, (dres if both else None), None, None, None, None
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dres2 = None if dres is None else dres.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        want_dw = ctx.needs_input_grad[2]
        block, block_r, warps = _tiles(n_rows, n_cols, x2.is_cuda)
        programs_wanted = sm_count(x2.device) * 4 if x2.is_cuda else 1
        # a power of two ≥ BLOCK_R: a compile-time loop bound with few variants
        rows_per_program = max(block_r, next_power_of_2(cdiv(n_rows, programs_wanted)))
        n_programs = cdiv(n_rows, rows_per_program)
        dw_partial = torch.empty((n_programs, n_cols) if want_dw else (1,), dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd[(n_programs,)](
            dy2,
            x2,
            weight,
            rstd,
            dy2 if dres2 is None else dres2,
            dx,
            dw_partial,
            x2.stride(0),
            n_rows,
            n_cols,
            ROWS_PER_PROGRAM=rows_per_program,
            BLOCK_R=block_r,
            BLOCK=block,
            WANT_DW=want_dw,
            HAS_DRES=dres2 is not None,
            num_warps=warps,
        )
        dw = dw_partial.sum(0).to(weight.dtype) if want_dw else None
        dx = dx.view(ctx.shape)
        return dx, (dx if both else None), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, room: int = 0) -> torch.Tensor:
    """The norm of x's rows; with `room`, each output row has that many spare columns beside it."""
    return mark(RMSNormFunction.apply(x, None, weight, eps, room, False), room)


def rms_norm_and_residual(
    norm: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the norm module's output for h, h) for h = x, or x + delta: the residual stream, whose grad this norm's
    backward adds to its own."""
    room = getattr(norm, ROOM, 0)
    y, stream = RMSNormFunction.apply(x, delta, norm.weight, norm.variance_epsilon, room, True)
    return mark(y, room), stream


def rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for the HF *RMSNorm modules of the patched families."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, getattr(self, ROOM, 0))

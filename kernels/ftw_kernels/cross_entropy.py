"""Fused linear cross-entropy: loss of hidden @ Wᵀ against targets without the full logits.

Rows are taken in chunks: one chunk's logits (bf16, chunk × vocab) are computed, a Triton kernel
turns them in place into dL/dlogits (softmax − one-hot, scaled) while it computes each row's
loss with an online log-sum-exp, and the chunk's dL/dhidden is one more matmul. The gradient is
thus complete after the forward; backward only scales it. The frozen output weight (LoRA) gets
no gradient and no matmul for one; a trainable one accumulates in fp32.

Peak extra memory: one chunk of logits plus dL/dhidden (tokens × hidden), against HF's
tokens × vocab logits in fp32 and their gradient.

Only the rows that carry a loss need logits: a chat dataset's prompts (train_on_inputs: false) and a padded batch's
padding are ignored rows, often half a batch or more. `target_rows` lists the others from the batch's CPU labels
(the trainer calls it as it reads a batch, so nothing is read back from the device), and the causal LM's forward
(kernels/ftw_kernels/causal_lm.py) gathers those rows of the hidden states before the loss head: the head's two
GEMMs and its softmax cost what the targets cost, not what the batch does.

`fused_linear_token_losses` is the per-row variant (the DPO family's log-probabilities): the same
chunks, each row's loss returned, dL/dhidden kept unscaled and scaled row by row in backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import next_power_of_2
from ftw_kernels.precision import compute_dtype, no_autocast

CHUNK_LOGITS_BYTES = 1 << 30  # one chunk's bf16 logits: 1 GiB (4096 rows of a 128k vocab)


@triton.jit
def _ce_rows(LOGITS, TARGETS, LOSS, stride, ignore_index, N_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: loss = lse − logit[target]; logits overwritten with softmax − onehot."""
    row = tl.program_id(0)
    ptr = LOGITS + row.to(tl.int64) * stride
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        for start in range(0, N_COLS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(ptr + cols, tl.zeros([BLOCK], dtype=tl.float32).to(LOGITS.dtype.element_ty), mask=cols < N_COLS)
        tl.store(LOSS + row, 0.0)
    else:
        m = -float("inf")
        acc = 0.0
        for start in range(0, N_COLS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < N_COLS, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(acc)
        target_logit = tl.load(ptr + target).to(tl.float32)
        tl.store(LOSS + row, lse - target_logit)
        for start in range(0, N_COLS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < N_COLS
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _row_chunks(hidden: torch.Tensor, weight: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of the row chunks whose logits take CHUNK_LOGITS_BYTES each."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = max(1, min(n_rows, CHUNK_LOGITS_BYTES // (vocab * hidden.element_size())))
    return [(start, min(start + chunk, n_rows)) for start in range(0, n_rows, chunk)]


def _chunk_dlogits(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """One chunk's dL/dlogits (softmax − onehot, unscaled; zero on ignored rows), its row losses written to `losses`."""
    vocab = weight.shape[0]
    logits = h @ weight.t()
    _ce_rows[(h.shape[0],)](
        logits,
        targets,
        losses,
        logits.stride(0),
        ignore_index,
        N_COLS=vocab,
        BLOCK=min(next_power_of_2(vocab), 4096 if h.is_cuda else 1024),
        num_warps=8 if h.is_cuda else 1,
    )
    return logits


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        divisor: torch.Tensor | float | None,
    ) -> torch.Tensor:
        dtype = compute_dtype(hidden)
        with no_autocast(hidden):
            return FusedLinearCrossEntropy._forward(ctx, hidden, weight, targets, ignore_index, divisor, dtype)

    @staticmethod
    def _forward(ctx, hidden_in, weight_in, targets, ignore_index, divisor, dtype):
        hidden, weight = hidden_in.to(dtype), weight_in.to(dtype)
        targets = targets.contiguous()
        if divisor is None:
            denom: torch.Tensor | float = (targets != ignore_index).sum().clamp(min=1).float()
        else:  # a number divides as one (no copy to the device, and the bf16 gradient is scaled by it unrounded)
            denom = divisor.to(hidden.device).float() if isinstance(divisor, torch.Tensor) else float(divisor)
        want_dw = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # the 1/denominator is applied once at the end: as a device tensor, reading it would sync
        for start, end in _row_chunks(hidden, weight):
            h = hidden[start:end]
            dlogits = _chunk_dlogits(h, weight, targets[start:end], losses[start:end], ignore_index)
            if grad_hidden is not None:
                torch.matmul(dlogits, weight, out=grad_hidden[start:end])
            if want_dw:
                grad_weight.addmm_(dlogits.t().float(), h.float())
            del dlogits  # freed before the next chunk's logits are allocated: one chunk alive, not two
        loss = losses.sum() / denom
        if grad_hidden is not None:
            grad_hidden.div_(denom.to(grad_hidden.dtype) if isinstance(denom, torch.Tensor) else denom)
        if want_dw:
            grad_weight.div_(denom)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden_in.dtype, weight_in.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = (grad_hidden * grad_loss.to(grad_hidden.dtype)).to(ctx.hidden_dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None


class FusedLinearTokenLosses(torch.autograd.Function):
    """Per-row losses (the DPO family sums them per sequence). A row's loss depends on its hidden
    row alone, so the forward keeps the unscaled dL/dhidden rows ((softmax − onehot)·W, rows ×
    hidden) and backward scales each by its incoming gradient. A trainable output weight's gradient
    Σᵣ gᵣ·dlogitsᵣᵀ·hᵣ needs those per-row g, so backward recomputes each chunk's logits for it."""

    @staticmethod
    def forward(ctx, hidden_in: torch.Tensor, weight_in: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        dtype = compute_dtype(hidden_in)
        with no_autocast(hidden_in):
            hidden, weight = hidden_in.to(dtype), weight_in.to(dtype)
            targets = targets.contiguous()
            want_dh = ctx.needs_input_grad[0]
            grad_rows = torch.empty_like(hidden) if want_dh else None
            losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for start, end in _row_chunks(hidden, weight):
                dlogits = _chunk_dlogits(hidden[start:end], weight, targets[start:end], losses[start:end], ignore_index)
                if grad_rows is not None:
                    torch.matmul(dlogits, weight, out=grad_rows[start:end])
                del dlogits  # one chunk alive at a time
        want_dw = ctx.needs_input_grad[1]
        ctx.save_for_backward(grad_rows, *((hidden, weight, targets) if want_dw else (None, None, None)))
        ctx.hidden_dtype, ctx.weight_dtype, ctx.ignore_index = hidden_in.dtype, weight_in.dtype, ignore_index
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        grad_rows, hidden, weight, targets = ctx.saved_tensors
        g = grad_losses.float()[:, None]
        dh = (grad_rows.float() * g).to(ctx.hidden_dtype) if grad_rows is not None else None
        dw = None
        if weight is not None:
            with no_autocast(hidden):
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                scratch = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
                for start, end in _row_chunks(hidden, weight):
                    h = hidden[start:end]
                    dlogits = _chunk_dlogits(h, weight, targets[start:end], scratch[start:end], ctx.ignore_index)
                    grad_weight.addmm_(dlogits.t().float(), h.float() * g[start:end])
                    del dlogits  # one chunk alive at a time
            dw = grad_weight.to(ctx.weight_dtype)
        return dh, dw, None, None


def target_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The flat indices of a batch's rows whose next-token label is not ignored (HF's causal shift: row t predicts
    label t+1, the last row of each sequence nothing), from its CPU labels: their count is known on the host, so
    gathering them on the device needs no sync."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return (shifted.reshape(-1) != ignore_index).nonzero().squeeze(1)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    divisor: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean token loss of `hidden @ weight.T` (sum / divisor when given: HF's num_items_in_batch)."""
    return FusedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index, divisor
    )


def fused_linear_token_losses(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Each row's cross-entropy of `hidden @ weight.T` against its target (fp32, 0 at ignored rows),
    as F.cross_entropy(reduction="none") on the logits would give, without them. Under no_grad
    (the DPO reference forward) nothing is kept for a backward: inside an autograd.Function's
    forward, needs_input_grad does not see the grad mode, so the inputs go in detached."""
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
    return FusedLinearTokenLosses.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index)

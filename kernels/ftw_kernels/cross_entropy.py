"""Fused linear cross-entropy: loss of hidden @ Wᵀ against targets without the full logits.

Rows are taken in chunks: one chunk's logits (bf16, chunk × vocab) are computed, a Triton kernel
turns them in place into dL/dlogits (softmax − one-hot, scaled) while it computes each row's
loss with an online log-sum-exp, and the chunk's dL/dhidden is one more matmul. The gradient is
thus complete after the forward; backward only scales it. The frozen output weight (LoRA) gets
no gradient and no matmul for one; a trainable one accumulates in fp32.

Peak extra memory: one chunk of logits plus dL/dhidden (tokens × hidden), against HF's
tokens × vocab logits in fp32 and their gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
        n_rows, dim = hidden.shape
        vocab = weight.shape[0]
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum()
        denom = (n_valid.clamp(min=1) if divisor is None else torch.as_tensor(divisor, device=hidden.device)).float()
        want_dw = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        chunk = max(1, min(n_rows, CHUNK_LOGITS_BYTES // (vocab * hidden.element_size())))
        block = min(triton.next_power_of_2(vocab), 4096 if hidden.is_cuda else 1024)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            h = hidden[start:end]
            logits = h @ weight.t()
            # the 1/denominator is applied once at the end: it is a device tensor (reading it would sync)
            _ce_rows[(end - start,)](
                logits,
                targets[start:end],
                losses[start:end],
                logits.stride(0),
                ignore_index,
                N_COLS=vocab,
                BLOCK=block,
                num_warps=8 if hidden.is_cuda else 1,
            )
            if grad_hidden is not None:
                torch.matmul(logits, weight, out=grad_hidden[start:end])
            if want_dw:
                grad_weight.addmm_(logits.t().float(), h.float())
        loss = losses.sum() / denom
        if grad_hidden is not None:
            grad_hidden.div_(denom.to(grad_hidden.dtype))
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

"""Grouped GEMMs over tokens sorted by expert, with the LoRA product fused in (Triton).

Rows are (token, expert) pairs sorted by expert; a row block never straddles two experts, so each
program multiplies its rows by one expert's weight. Two kernels:

- `scatter_mm`: out[r] = x[r] Wₑᵀ + s·(x[r] Aₑᵀ) Bₑᵀ. x rows may be gathered through an index
  (tokens read in place, never copied per expert) and output rows scattered through one (results
  land in routing order). x·Aₑᵀ is accumulated in the same K loop as x·Wₑᵀ, so W + BA is never
  formed; it can be written out (the backward needs it). With `swiglu`, Wₑ holds [gate; up]
  and the program computes both halves of its columns and writes silu(gate)·up, plus the
  pre-activations for the backward.
- `grouped_tn`: Gₑ = s·Lₑᵀ Rₑ over each expert's rows (the LoRA A/B gradients), rows of L and
  R optionally gathered.

Strides are passed as they are, so a transposed weight (Wᵀ in the backward) is a view, not a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftw_kernels.grids import cdiv, rank_block
from ftw_kernels.precision import INTERPRETED, compute_dtype

# Row blocks are fixed (the block table is built for them); on a GPU the column/reduction tiles are
# autotuned per shape, under the CPU interpreter they are small fixed ones (its cost is per element).
BM = 16 if INTERPRETED else 64
BN, BK = 16, 16
TN_BP, TN_BQ, TN_BM = 16, 16, 16


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32/fp64 products exact ("ieee", not TF32); half-precision inputs ignore it."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


@triton.jit
def _scatter_mm_kernel(
    X,
    W,
    A,
    B,
    Y,
    XA,
    HOUT,
    x_index,
    y_index,
    block_expert,
    block_start,
    block_end,
    N,
    R,
    scale,
    sxm,
    sxk,
    swe,
    swn,
    swk,
    sae,
    sar,
    sak,
    sbe,
    sbn,
    sbr,
    sym,
    syn,
    sxam,
    sxar,
    shm,
    shn,
    GATHER_X: tl.constexpr,
    SCATTER_Y: tl.constexpr,
    HAS_LORA: tl.constexpr,
    WRITE_XA: tl.constexpr,
    SWIGLU: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert + pid_m).to(tl.int64)
    if e >= 0:
        start = tl.load(block_start + pid_m)
        end = tl.load(block_end + pid_m)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows = rows.to(tl.int64)
        x_rows = tl.load(x_index + rows, mask=row_ok, other=0).to(tl.int64) if GATHER_X else rows
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(X + x_rows[:, None] * sxm + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ptr = W + e * swe + cols[None, :] * swn + ks[:, None] * swk
            w_ok = k_ok[:, None] & col_ok[None, :]
            acc += tl.dot(x, tl.load(w_ptr, mask=w_ok, other=0.0), out_dtype=ACC, input_precision=PREC)
            if SWIGLU:  # the up half of [gate; up] sits N rows below the gate half
                acc_up += tl.dot(x, tl.load(w_ptr + N * swn, mask=w_ok, other=0.0), out_dtype=ACC, input_precision=PREC)
            if HAS_LORA:
                a = tl.load(
                    A + e * sae + ranks[None, :] * sar + ks[:, None] * sak,
                    mask=k_ok[:, None] & rank_ok[None, :],
                    other=0.0,
                )
                xa += tl.dot(x, a, out_dtype=ACC, input_precision=PREC)
        if HAS_LORA:
            xa_low = xa.to(B.dtype.element_ty)
            b_ptr = B + e * sbe + cols[None, :] * sbn + ranks[:, None] * sbr
            b_ok = rank_ok[:, None] & col_ok[None, :]
            acc += scale * tl.dot(xa_low, tl.load(b_ptr, mask=b_ok, other=0.0), out_dtype=ACC, input_precision=PREC)
            if SWIGLU:
                acc_up += scale * tl.dot(
                    xa_low, tl.load(b_ptr + N * sbn, mask=b_ok, other=0.0), out_dtype=ACC, input_precision=PREC
                )
            if WRITE_XA:
                if pid_n == 0:
                    tl.store(
                        XA + rows[:, None] * sxam + ranks[None, :] * sxar,
                        xa.to(XA.dtype.element_ty),
                        mask=row_ok[:, None] & rank_ok[None, :],
                    )
        y_rows = tl.load(y_index + rows, mask=row_ok, other=0).to(tl.int64) if SCATTER_Y else rows
        out_ok = row_ok[:, None] & col_ok[None, :]
        if SWIGLU:
            # pre-activations [gate | up] for the backward, and h = silu(gate) * up for the down projection
            pre = Y + y_rows[:, None] * sym + cols[None, :] * syn
            tl.store(pre, acc.to(Y.dtype.element_ty), mask=out_ok)
            tl.store(pre + N * syn, acc_up.to(Y.dtype.element_ty), mask=out_ok)
            g = acc.to(tl.float32)
            h = g * tl.sigmoid(g) * acc_up.to(tl.float32)
            tl.store(HOUT + y_rows[:, None] * shm + cols[None, :] * shn, h.to(HOUT.dtype.element_ty), mask=out_ok)
        else:
            tl.store(Y + y_rows[:, None] * sym + cols[None, :] * syn, acc.to(Y.dtype.element_ty), mask=out_ok)


@triton.jit
def _grouped_tn_kernel(
    L,
    R,
    G,
    l_index,
    r_index,
    offsets,
    P,
    Q,
    scale,
    slm,
    slp,
    srm,
    srq,
    sge,
    sgp,
    sgq,
    GATHER_L: tl.constexpr,
    GATHER_R: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    e = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < P
    q_ok = qs < Q
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    m0 = start
    while m0 < end:  # an expert with no rows runs no iteration: its G is 0
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows = rows.to(tl.int64)
        lr = tl.load(l_index + rows, mask=row_ok, other=0).to(tl.int64) if GATHER_L else rows
        rr = tl.load(r_index + rows, mask=row_ok, other=0).to(tl.int64) if GATHER_R else rows
        lt = tl.load(L + lr[None, :] * slm + ps[:, None] * slp, mask=row_ok[None, :] & p_ok[:, None], other=0.0)
        r = tl.load(R + rr[:, None] * srm + qs[None, :] * srq, mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        acc += tl.dot(lt, r.to(lt.dtype), out_dtype=ACC, input_precision=PREC)
        m0 += BLOCK_M
    tl.store(
        G + e.to(tl.int64) * sge + ps[:, None] * sgp + qs[None, :] * sgq,
        (acc * scale).to(G.dtype.element_ty),
        mask=p_ok[:, None] & q_ok[None, :],
    )


def _tuned(kernel, space: list[dict], key: list[str]):
    """`kernel` autotuned over `space` on a GPU; as it is under the interpreter."""
    if INTERPRETED:
        return kernel
    configs = [
        triton.Config(
            {k: v for k, v in c.items() if k not in ("warps", "stages")}, num_warps=c["warps"], num_stages=c["stages"]
        )
        for c in space
    ]
    return triton.autotune(configs=configs, key=key)(kernel)


_scatter_mm = _tuned(
    _scatter_mm_kernel,
    [
        {"BLOCK_N": n, "BLOCK_K": k, "warps": w, "stages": st}
        for n, k, w, st in (
            (64, 64, 4, 3),
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (64, 32, 4, 4),
            (128, 32, 8, 4),
            (256, 64, 8, 3),
        )
    ],
    key=["N", "K", "R", "SWIGLU", "HAS_LORA", "GATHER_X", "SCATTER_Y"],
)
_grouped_tn = _tuned(
    _grouped_tn_kernel,
    [
        {"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_M": m, "warps": w, "stages": st}
        for p, q, m, w, st in (
            (64, 64, 64, 4, 3),
            (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (32, 64, 64, 4, 4),
            (128, 128, 32, 8, 3),
        )
    ],
    key=["P", "Q"],
)


def in_compute_dtype(ctx, x, w_gu, w_d, factors: tuple, contiguous: bool = False) -> tuple:
    """(x, w_gu, w_d, factors) in the dtype the experts compute in: autocast's (call this before
    switching it off) or x's; `ctx` keeps x's and the factors' own dtypes for their gradients."""
    dtype = compute_dtype(x)
    lora = factors[0] is not None
    ctx.x_dtype, ctx.lora_dtype = x.dtype, factors[0].dtype if lora else None
    if lora:
        factors = tuple(t.to(dtype).contiguous() if contiguous else t.to(dtype) for t in factors)
    return x.to(dtype), w_gu.to(dtype), w_d.to(dtype), factors


class Routing:
    """Rows sorted by expert, and (`block_table`) the row blocks the Triton kernels walk; built
    without a host sync."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, block_table: bool = True):
        flat = top_k_index.reshape(-1)
        self.top_k = top_k_index.shape[-1]
        self.num_experts = num_experts
        self.rows = flat.numel()
        sorted_experts, self.perm = torch.sort(flat, stable=True)  # perm[r]: routing slot (token·k + j) of sorted row r
        self.token = self.perm // self.top_k  # token of sorted row r
        # scatter_add, not bincount: bincount reads its maximum back to the host (a sync per layer)
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
            0, sorted_experts, torch.ones_like(sorted_experts)
        )
        self.ends = self.counts.cumsum(0).to(torch.int32)  # expert e's rows end at ends[e] (grouped_mm's offs)
        self.offsets = torch.cat([self.ends.new_zeros(1), self.ends])  # expert e's rows: offsets[e]:offsets[e+1]
        if block_table:
            self._block_table()

    def _block_table(self) -> None:
        counts, ends, num_experts = self.counts, self.ends.long(), self.num_experts
        blocks = (counts + BM - 1) // BM
        cum = blocks.cumsum(0)
        b = torch.arange(cdiv(self.rows, BM) + num_experts, device=counts.device)  # an upper bound on blocks
        expert = torch.searchsorted(cum, b, right=True)
        e = expert.clamp(max=num_experts - 1)
        self.block_expert = torch.where(expert < num_experts, e, -1).to(torch.int32)
        self.block_start = (ends[e] - counts[e] + (b - (cum[e] - blocks[e])) * BM).to(torch.int32)
        self.block_end = ends[e].to(torch.int32)


def scatter_mm(
    x, w, routing: Routing, out, *, a=None, b=None, scale=0.0, x_index=None, y_index=None, xa_out=None, h_out=None
) -> None:
    """out[y_index[r]] = x[x_index[r]] Wₑᵀ (+ s·(x Aₑᵀ) Bₑᵀ) for every sorted row r of expert e.

    w: (E, N, K) (or (E, 2N, K) with h_out: SwiGLU, `out` then gets the 2N pre-activations and
    h_out silu(gate)·up); a: (E, r, K), b: (E, N, r); xa_out: (rows, r) gets x·Aₑᵀ."""
    n = h_out.shape[1] if h_out is not None else out.shape[1]
    k = x.shape[1]
    lora = a is not None
    rank = a.shape[1] if lora else 1
    dummy = out
    a_, b_ = (a, b) if lora else (dummy.new_empty(1, 1, 1), dummy.new_empty(1, 1, 1))
    xa_ = xa_out if xa_out is not None else dummy
    h_ = h_out if h_out is not None else dummy
    blocks = routing.block_expert.numel()
    tiles = {"BLOCK_N": BN, "BLOCK_K": BK} if INTERPRETED else {}
    _scatter_mm[lambda meta: (blocks, cdiv(n, meta["BLOCK_N"]))](
        x,
        w,
        a_,
        b_,
        out,
        xa_,
        h_,
        x_index if x_index is not None else routing.perm,
        y_index if y_index is not None else routing.perm,
        routing.block_expert,
        routing.block_start,
        routing.block_end,
        n,
        rank,
        float(scale),
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        a_.stride(0),
        a_.stride(1),
        a_.stride(2),
        b_.stride(0),
        b_.stride(1),
        b_.stride(2),
        out.stride(0),
        out.stride(1),
        xa_.stride(0),
        xa_.stride(1),
        h_.stride(0),
        h_.stride(1),
        GATHER_X=x_index is not None,
        SCATTER_Y=y_index is not None,
        HAS_LORA=lora,
        WRITE_XA=xa_out is not None,
        SWIGLU=h_out is not None,
        ACC=_acc_dtype(x.dtype),
        PREC=_precision(x.dtype),
        K=k,
        BLOCK_M=BM,
        BLOCK_R=rank_block(rank),
        **tiles,
    )


def grouped_tn(left, right, routing: Routing, out, *, scale=1.0, l_index=None, r_index=None) -> torch.Tensor:
    """out[e] = s·left[rows of e]ᵀ right[rows of e]: (E, P, Q) from left (·, P) and right (·, Q)."""
    p, q = left.shape[1], right.shape[1]
    tiles = {"BLOCK_P": TN_BP, "BLOCK_Q": TN_BQ, "BLOCK_M": TN_BM} if INTERPRETED else {}
    _grouped_tn[lambda meta: (routing.num_experts, cdiv(p, meta["BLOCK_P"]), cdiv(q, meta["BLOCK_Q"]))](
        left,
        right,
        out,
        l_index if l_index is not None else routing.perm,
        r_index if r_index is not None else routing.perm,
        routing.offsets,
        p,
        q,
        float(scale),
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        GATHER_L=l_index is not None,
        GATHER_R=r_index is not None,
        ACC=_acc_dtype(left.dtype),
        PREC=_precision(left.dtype),
        **tiles,
    )
    return out

"""A LoRA projection's two rank-r products of its output grad dy, from one read of dy.

The backward needs dy·(s·B) (tokens × r: the A grads' and dx's rank-r term share it) and B's grad s·dyᵀ·(x·Aᵀ)
(out × r). Both are skinny products whose time is reading dy, tokens × out: cuBLAS reads it once for each,
~0.2 ms a decoder layer at either Llama shape on an H200. Here one kernel streams each tile of dy once into both
products: a program owns a tile of tokens and a range of output columns, keeps its tile's dy·(s·B) in registers
across the range, and writes B's grad for the tile as an fp32 partial; the partials are summed after (and the
range's partial rows of dy·(s·B), when the output columns are split for parallelism). The sums run in a fixed
order: the result does not depend on scheduling, as cuBLAS's split-K does not.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# enough programs to keep an H200's 132 SMs streaming; fewer under the interpreter, whose cost is per element
TOKENS_PER_PROGRAM = 16 if INTERPRETED else 128
COLUMNS_PER_LOAD = 16 if INTERPRETED else 64
MIN_PROGRAMS = 1 if INTERPRETED else 264
STAGES = 1 if INTERPRETED else 4
ENABLED = os.environ.get("FTW_RANK_GRADS", "1") != "0"
"""Read at every call: off, the fused LoRA backward takes cuBLAS's two GEMMs (FTW_RANK_GRADS=0, for A/B runs)."""
ON_CPU = False
"""The kernel on CPU tensors (under TRITON_INTERPRET only): the tests that compare it with cuBLAS's path set it."""


def serves(dy: torch.Tensor) -> bool:
    """Whether `rank_grads` takes this dy: half-precision on CUDA (an fp32 dy keeps cuBLAS's fp32 GEMMs, which
    tl.dot would run in tf32), or any under the interpreter where asked."""
    if not ENABLED:
        return False
    if dy.is_cuda:
        return dy.dtype in (torch.bfloat16, torch.float16)
    return INTERPRETED and ON_CPU


@triton.jit
def _rank_grads(
    DY,
    B,
    XA,
    DYB,
    DBP,
    n_tokens,
    n_out,
    rank,
    s_dy,
    s_bo,
    s_br,
    s_xt,
    s_xr,
    s_ys,
    s_yt,
    s_yr,
    scale,
    COLS: tl.constexpr,
    R: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    WANT_DB: tl.constexpr,
):
    tile, split = tl.program_id(0), tl.program_id(1)
    tokens = tile * BT + tl.arange(0, BT)
    r = tl.arange(0, R)
    t_ok, r_ok = tokens < n_tokens, r < rank
    if WANT_DB:
        xa = tl.load(
            XA + tokens[:, None].to(tl.int64) * s_xt + r[None, :] * s_xr, mask=t_ok[:, None] & r_ok[None, :], other=0.0
        )
    dyb = tl.zeros([BT, R], dtype=tl.float32)
    first = split * COLS  # the last split's columns past n_out are masked
    for o0 in range(0, COLS, BO):
        cols = first + o0 + tl.arange(0, BO)
        c_ok = cols < n_out
        dy = tl.load(
            DY + tokens[:, None].to(tl.int64) * s_dy + cols[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0
        )
        b = tl.load(B + cols[:, None] * s_bo + r[None, :] * s_br, mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        dyb += tl.dot(dy, b.to(dy.dtype))
        if WANT_DB:  # this tile's share of s·dyᵀ·xa, in fp32
            part = tl.dot(tl.trans(dy), xa.to(dy.dtype)) * scale
            offs = (tile.to(tl.int64) * n_out + cols[:, None]) * R + r[None, :]
            tl.store(DBP + offs, part, mask=c_ok[:, None])
    out = DYB + split.to(tl.int64) * s_ys + tokens[:, None].to(tl.int64) * s_yt + r[None, :] * s_yr
    tl.store(out, dyb.to(DYB.dtype.element_ty), mask=t_ok[:, None] & r_ok[None, :])


def rank_grads(
    dy: torch.Tensor, b: torch.Tensor, xa: torch.Tensor | None, scale: float, dyb: torch.Tensor
) -> torch.Tensor | None:
    """Write (dy·b)ᵀ into `dyb` (r × tokens, any strides) and return B's grad scale·dyᵀ·xa (out × r, fp32), or
    None when `xa` is None (B frozen). dy: tokens × out, rows contiguous; b: out × r (s·B); xa: tokens × r."""
    n_tokens, n_out = dy.shape
    rank = b.shape[1]
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    R = max(16, triton.next_power_of_2(rank))
    tiles = triton.cdiv(n_tokens, TOKENS_PER_PROGRAM)
    splits = max(1, min(triton.cdiv(MIN_PROGRAMS, tiles), triton.cdiv(n_out, 4 * COLUMNS_PER_LOAD)))
    cols_per_split = triton.cdiv(triton.cdiv(n_out, splits), COLUMNS_PER_LOAD) * COLUMNS_PER_LOAD
    splits = triton.cdiv(n_out, cols_per_split)
    if splits == 1:  # written in place, cast to dyb's dtype
        target, strides = dyb, (0, dyb.stride(1), dyb.stride(0))
    else:  # each split's fp32 partial, summed below in a fixed order
        target = torch.empty(splits, n_tokens, rank, device=dy.device, dtype=torch.float32)
        strides = target.stride()
    partials = torch.empty(tiles, n_out, R, device=dy.device, dtype=torch.float32) if xa is not None else dy
    _rank_grads[(tiles, splits)](
        dy,
        b,
        xa if xa is not None else dy,
        target,
        partials,
        n_tokens,
        n_out,
        rank,
        dy.stride(0),
        b.stride(0),
        b.stride(1),
        *(xa.stride() if xa is not None else (0, 0)),
        *strides,
        float(scale),
        COLS=cols_per_split,
        R=R,
        BT=TOKENS_PER_PROGRAM,
        BO=COLUMNS_PER_LOAD,
        WANT_DB=xa is not None,
        num_warps=8 if TOKENS_PER_PROGRAM >= 256 else 4,
        num_stages=STAGES,
    )
    if splits > 1:
        dyb.copy_(target.sum(0).t())
    if xa is None:
        return None
    grad = partials.sum(0)
    return grad if R == rank else grad[:, :rank].contiguous()

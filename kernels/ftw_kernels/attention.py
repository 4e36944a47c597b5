"""Attention over packed samples without cross-contamination: torch's varlen flash attention.

Registered with transformers as the attention implementation "ftw_varlen". A packed row holds
several samples whose position ids restart at 0 (the data pipeline's contract); each sample, and
each run of padding, becomes one causal segment of the flattened (tokens, heads, head_dim)
batch, so no token attends across samples, and no padded-batch token attends to padding. No
(seq × seq) mask is ever built, and the whole pack costs Σ sᵢ² instead of S².

Where every segment has the same length (full-length rows, or full-length samples packed into one
row) and no sliding window cuts it, the segments are a batch of equal rows (a view of the same
memory), and the same causal attention runs as cuDNN's fused attention through
`scaled_dot_product_attention`: on an H200 it takes 0.58× the flash kernels' time at Llama-8B's shape
(bench/attention.py), with grouped kv heads as they are. A torch or GPU whose cuDNN refuses the call
falls back to flash for the rest of the process (`CUDNN_REFUSED`), with the reason in the log;
`FTW_CUDNN_ATTENTION=0` keeps flash from the start.

The segment boundaries depend on the batch's data, so computing them on the device costs a host
sync per forward (`nonzero`, the longest length). The trainer's batch reader computes them on
the host instead, from the CPU copy of the batch (`host_segments`), and passes them in transformers'
names (`cu_seq_lens_q/_k`, `max_length_q/_k`). The mask function registered with it returns the
2D padding mask as is: transformers' flash one reads `mask.all()` back, and with an explicit mask
transformers does not inspect position_ids for packing (another read-back) either.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch

NAME = "ftw_varlen"
_segments_cache: list = []  # one entry: the layers of one forward share position ids and mask
CUDNN_REFUSED: list[str] = []  # why cuDNN refused a call of this process: flash from then on
log = logging.getLogger("ftw.kernels")


def varlen_attn_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def segment_starts(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, segments of the flattened batch) and the longest segment's length. A row's padding is one
    segment: its position ids are all 0 (worker/train/batches.collate), and read as restarts they made each pad
    token a segment of its own, thousands a padded micro-batch, each a row of programs in the flash kernels' grid."""
    starts = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    starts[:, 0] = True
    m = None if attention_mask is None else attention_mask.bool()
    if position_ids is not None:
        restarts = (position_ids == 0).expand(batch, seq)
        starts |= restarts if m is None else restarts & m
    if m is not None:
        starts[:, 1:] |= m[:, 1:] != m[:, :-1]
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, torch.tensor([batch * seq], device=device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())  # one host sync per forward (cached below)


def host_segments(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor | int]:
    """The varlen keyword arguments of one batch, from its CPU tensors (no device involved)."""
    batch, seq = position_ids.shape
    cu, longest = segment_starts(position_ids, attention_mask, batch, seq, position_ids.device)
    out: dict[str, torch.Tensor | int] = {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    if attention_mask is None:  # packed: with an explicit mask transformers skips its packing check (a sync)
        out["attention_mask"] = torch.ones_like(position_ids)
    return out


def _cached_segments(position_ids, attention_mask, batch, seq, device):
    key = (position_ids, attention_mask, getattr(position_ids, "_version", None), batch, seq)
    if (
        _segments_cache
        and all(a is b for a, b in zip(_segments_cache[0][:2], key[:2]))
        and _segments_cache[0][2:] == key[2:]
    ):
        return _segments_cache[1]
    value = segment_starts(position_ids, attention_mask, batch, seq, device)
    _segments_cache[:] = [key, value]
    return value


def cudnn_for_equal_segments() -> bool:
    """Equal segments go to cuDNN unless it refused a call or FTW_CUDNN_ATTENTION=0 (docs/operations.md)."""
    return not CUDNN_REFUSED and os.environ.get("FTW_CUDNN_ATTENTION", "1") != "0"


@functools.cache  # read once per function, not in every layer's forward
def _supports_gqa(fn) -> bool:
    return "enable_gqa" in inspect.signature(fn).parameters


class GroupedVarlen(torch.autograd.Function):
    """Causal varlen flash attention with fewer kv heads than query heads, for a torch whose `varlen_attn`
    has no `enable_gqa` (2.11). The flash kernels take grouped heads natively; expanding k and v to every
    query head instead would copy them and keep the copies for backward (3 GiB a step at Llama-8B's
    32/8 heads, 4 × 2048 tokens)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, longest: int, scale: float | None, left: int):  # type: ignore[override]
        ctx.segments = (cu, cu, longest, longest, 0.0, left < 0)  # no dropout; causal unless a window
        ctx.window = {"scale": scale, "window_size_left": left, "window_size_right": 0}
        out, lse, rng, _, _ = torch.ops.aten._flash_attention_forward(q, k, v, *ctx.segments, False, **ctx.window)
        ctx.save_for_backward(q, k, v, out, lse, rng)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse, rng = ctx.saved_tensors
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, *ctx.segments, rng, unused, **ctx.window
        )
        return dq, dk, dv, None, None, None, None


def _cached_attention(query, key, value, attention_mask, scaling, sliding_window):
    """Decoding with a KV cache (generation, evaluation by sampling): the new queries are the last
    positions of the keys; plain sdpa with that bottom-right causal mask and the padding mask."""
    q_len, k_len = query.shape[2], key.shape[2]
    k_idx = torch.arange(k_len, device=query.device)
    q_idx = torch.arange(k_len - q_len, k_len, device=query.device)
    allowed = k_idx[None, :] <= q_idx[:, None]
    if sliding_window:
        allowed &= k_idx[None, :] > q_idx[:, None] - sliding_window
    mask = allowed[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -k_len:].bool()
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2), None


def equal_segments(cu: torch.Tensor, longest: int, batch: int, seq: int) -> int:
    """How many segments of one length the batch's batch·seq tokens are (each `longest` long), else 0: as many
    boundaries as that many equal segments need leaves no room for a shorter one."""
    tokens = batch * seq
    return tokens // longest if tokens % longest == 0 and cu.numel() - 1 == tokens // longest else 0


def _cudnn_attention(query, key, value, scaling, segments: int):
    """Causal attention of `segments` equal segments by cuDNN, as (batch, seq, heads, dim); None where this
    torch/GPU refuses it (then never again)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, seq, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(segments, -1, t.shape[1], dim).transpose(1, 2) for t in (query, key, value))
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
            )
    except RuntimeError as e:  # no cuDNN attention for this shape, dtype, GPU or torch build
        CUDNN_REFUSED.append(str(e).splitlines()[0])
        log.warning("cuDNN attention refused equal segments (%s); flash attention from now on", CUDNN_REFUSED[0])
        return None
    return out.transpose(1, 2).reshape(batch, seq, heads, dim)


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    position_ids=None,
    **kwargs,
):
    """transformers attention interface: query (b, h, s, d), key/value (b, h_kv, s, d) →
    output (b, s, h, d), no weights."""
    if dropout:
        raise ValueError("ftw_varlen attention has no attention dropout; set attention_dropout: 0")
    if key.shape[2] != query.shape[2]:
        return _cached_attention(query, key, value, attention_mask, scaling, sliding_window)
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or longest is None:  # not given by the caller: from the device (one sync)
        cu, longest = _cached_segments(position_ids, attention_mask, batch, seq, query.device)
    segments = equal_segments(cu, longest, batch, seq)
    if segments and query.is_cuda and (not sliding_window or sliding_window >= longest) and cudnn_for_equal_segments():
        out = _cudnn_attention(query, key, value, scaling, segments)
        if out is not None:
            return out, None
    varlen_attn = varlen_attn_fn()
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)  # views where the model's layout is (b, s, h, d)
    k = key.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    window = (-1, 0) if not sliding_window else (sliding_window - 1, 0)
    if kv_heads == heads:
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window)
    elif _supports_gqa(varlen_attn):
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window, enable_gqa=True)
    else:
        out = GroupedVarlen.apply(q, k, v, cu, longest, scaling, window[0])
    return out.view(batch, seq, heads, dim), None


def padding_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """The 2D padding mask (its last kv_length columns), or None: what varlen attention reads.
    Unlike transformers' flash_attention_mask it never drops an all-ones mask (reading that would sync)."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def register() -> None:
    """Make "ftw_varlen" a transformers attention implementation (its mask: `padding_mask`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, padding_mask)

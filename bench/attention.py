"""Attention forward + backward at a training step's shape, by backend: what ftw's varlen attention costs, and what
the other kernels torch ships would cost on the same tokens.

    PYTHONPATH=$PWD:$PWD/kernels python3 bench/attention.py [--shape llama-1b]    # on the GPU (device tool)

Shape: Llama-3.1-8B's attention (32 query heads, 8 kv heads, head_dim 128), bf16, causal, 4 rows × 2048 tokens
(`--shape llama-1b`: Llama-3.2-1B's, head_dim 64, 8 rows × 2048), either full-length rows or packed rows
(samples of bench/train_throughput.py's lognormal lengths, attention kept inside each sample). Arms:
  ftw        kernels/ftw_kernels/attention.py's varlen_attention_forward: cuDNN for full-length rows (its equal-segments
             path), flash varlen with grouped kv heads for packed ones;
  flash      the same with the equal-segments path off (FTW_CUDNN_ATTENTION=0): flash varlen for every layout;
  expanded   torch's varlen_attn with k/v expanded to the 32 query heads (ftw's path on torch 2.11 before);
  sdpa-flash F.scaled_dot_product_attention, flash backend, enable_gqa (full-length rows only: no varlen);
  sdpa-cudnn the same with the cuDNN backend, k/v expanded;
  sdpa-cudnn-gqa  the cuDNN backend asked for enable_gqa (whether this torch's cuDNN path takes grouped heads);
Per arm: ms of forward + backward (CUDA events, mean of --iters after 3 warm-ups: bench/fp8_ops.py's `timed`), and
the MiB autograd keeps between forward and backward. Prints one markdown table; ratios against the ftw arm of the
same layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
from bench.fp8_ops import timed  # noqa: E402  (CUDA events, 3 warm-ups)


class Shape(NamedTuple):
    heads: int  # query heads
    kv_heads: int
    dim: int  # head_dim
    rows: int
    seq: int


SHAPES = {"llama-8b": Shape(32, 8, 128, 4, 2048), "llama-1b": Shape(32, 8, 64, 8, 2048)}  # the training benches'


def packed_positions(rows: int, seq: int, seed: int = 0):
    """Position ids restarting per sample: lognormal lengths (mean ~600, capped at seq), cut at each row's end."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        parts, filled = [], 0
        while filled < seq:
            n = int(min(seq - filled, max(16, torch.empty(1).log_normal_(6.2, 0.6, generator=g).item())))
            parts.append(torch.arange(n))
            filled += n
        out.append(torch.cat(parts))
    return torch.stack(out)


def expand(t, rep: int):
    return t[:, :, None].expand(-1, -1, rep, -1, -1).reshape(t.shape[0], t.shape[1] * rep, *t.shape[2:])


def arm_fn(arm: str, positions, dim: int):
    import torch
    import torch.nn.functional as F

    from ftw_kernels import attention

    scale = dim**-0.5
    if arm in ("ftw", "flash"):
        os.environ["FTW_CUDNN_ATTENTION"] = "1" if arm == "ftw" else "0"
        return lambda q, k, v: attention.varlen_attention_forward(
            torch.nn.Module(), q, k, v, None, scaling=scale, position_ids=positions
        )[0]
    if arm == "expanded":
        segments = attention.host_segments(positions.cpu(), None)
        cu, longest = segments["cu_seq_lens_q"].cuda(), segments["max_length_q"]

        def run(q, k, v):
            b, h, s, d = q.shape
            flat = [
                t.transpose(1, 2).reshape(b * s, -1, d)
                for t in (q, expand(k, h // k.shape[1]), expand(v, h // v.shape[1]))
            ]
            out = attention.varlen_attn_fn()(*flat, cu, cu, longest, longest, scale=scale, window_size=(-1, 0))
            return out.view(b, s, h, d)

        return run
    backend = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-cudnn-gqa": "CUDNN_ATTENTION"}[
        arm
    ]

    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            if arm == "sdpa-cudnn":
                k, v = expand(k, q.shape[1] // k.shape[1]), expand(v, q.shape[1] // v.shape[1])
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)

    return sdpa


def measure(arm: str, layout: str, iters: int, shape: Shape) -> dict:
    import torch

    rows, seq = shape.rows, shape.seq
    positions = (packed_positions(rows, seq) if layout == "packed" else torch.arange(seq).expand(rows, -1)).cuda()
    fn = arm_fn(arm, positions, shape.dim)
    torch.manual_seed(0)
    # the model's layout: (rows, seq, heads, dim) memory (the projections' and RoPE's output) seen as (b, h, s, d)
    leaves = [
        torch.randn(rows, seq, h, shape.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (shape.heads, shape.kv_heads, shape.kv_heads)
    ]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    grad = torch.randn(rows, seq, shape.heads, shape.dim, device="cuda", dtype=torch.bfloat16)

    def step():
        fn(q, k, v).backward(grad, retain_graph=True)

    try:
        step()  # the kernels' first call out of the measured memory
        before = torch.cuda.memory_allocated()
        out = fn(q, k, v)
        kept = torch.cuda.memory_allocated() - before
        out.backward(grad, retain_graph=True)
        del out
        ms = timed(step, iters)
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:120]}
    return {"ms": ms, "kept_mib": kept / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    ap.add_argument("--arms", default="ftw,flash,expanded,sdpa-flash,sdpa-cudnn,sdpa-cudnn-gqa")
    a = ap.parse_args()
    shape = SHAPES[a.shape]
    import torch

    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {a.shape}: {shape.rows} × {shape.seq} tokens, "
        f"{shape.heads}/{shape.kv_heads} heads of {shape.dim}"
    )
    print("| rows | arm | fwd+bwd ms | × ftw | MiB kept for backward |\n|---|---|---:|---:|---:|")
    for layout in ("full-length", "packed"):
        base = None
        for arm in a.arms.split(","):
            if arm.startswith("sdpa") and layout == "packed":
                continue
            r = measure(arm, layout, a.iters, shape)
            if "error" in r:
                print(f"| {layout} | {arm} | failed: {r['error']} | | |", flush=True)
                continue
            base = base or r["ms"]
            print(f"| {layout} | {arm} | {r['ms']:.2f} | {base / r['ms']:.2f}× | {r['kept_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

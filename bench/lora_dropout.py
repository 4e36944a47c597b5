"""LoRA's dropout, one input's worth, forward and backward: ftw's redrawn mask (kernels/ftw_kernels/lora_dropout.py)
against torch's dropout, which writes its mask beside its output and keeps it for the backward.

    python3 bench/lora_dropout.py --shapes llama-8b,llama-1b     # on a GPU (< 30 s)
    python3 bench/lora_dropout.py --shapes tiny                   # the harness on CPU (TRITON_INTERPRET=1)

Per input width of a decoder layer (hidden: q, k, v's, o's and gate, up's; intermediate: down's), one step's tokens:
- forward: x → x·keep/(1 − p) (ftw: read x, write the dropped copy; torch `native_dropout`: the same plus a
  1-byte mask, kept until the backward);
- backward: the rank-r term of dx through the mask (ftw: in place, the mask drawn again from the seed; torch
  `native_dropout_backward`: read the term and the kept mask, write a new tensor).
GB/s counts the bytes each must move (ftw's forward 2 × 2 bytes an element, torch's 2 × 2 + 1; backward 2 × 2
and 2 × 2 + 1). "kept MiB": what the backward holds for the mask between the passes.

Then the passes that draw the mask themselves against the ones they replaced (the same results: tests/kernels/
test_lora_dropout.py): dx's rank-r terms through the mask by one kernel against cuBLAS's product and the dropout
pass over it, per group of a layer (q, k, v: Σr 48; gate, up: 32; o, down: 16; training runs the kernel only up to
RANK_TERMS_MAX_R, which these rows chose); the SwiGLU forward writing h and
down's dropped input against the SwiGLU and the pass; its backward recomputing h dropped against the backward and
the pass. Times: bench/gpu_bench.py's `timed_us` (the GPU's time alone). p = 0.05."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402
from ftw_kernels.lora_dropout import Dropout, dropped, rank_terms_dropped  # noqa: E402
from ftw_kernels.swiglu import swiglu_backward, swiglu_forward_dropped, swiglu_forward_raw  # noqa: E402

P = 0.05


def main() -> None:
    args, device, dtype = setup(__doc__)
    print("| shape | input | pass | ftw µs (GB/s) | torch µs (GB/s) | ftw × torch | kept MiB ftw / torch |")
    print("|---|---|---|---:|---:|---:|---|")
    for shape in args.shapes:
        tokens, hidden, inter, _ = SHAPES[shape]
        for name, width in (("hidden (q/k/v, o, gate/up)", hidden), ("intermediate (down)", inter)):
            x = torch.randn(tokens, width, device=device, dtype=dtype)
            term = torch.randn_like(x)
            n, size = x.numel(), x.element_size()
            drop = Dropout(P, 1234)
            _, mask = torch.native_dropout(x, P, True)
            rows = {
                "forward": (lambda: dropped(x, drop), lambda: torch.native_dropout(x, P, True)),  # noqa: B023
                "backward": (
                    lambda: dropped(term, drop, out=term),  # noqa: B023
                    lambda: torch.ops.aten.native_dropout_backward(term, mask, 1 / (1 - P)),  # noqa: B023
                ),
            }
            kept = f"0 / {mask.numel() * mask.element_size() / 2**20:.0f}"
            for phase, (ours, theirs) in rows.items():
                ftw_us, torch_us = timed_us(ours, device), timed_us(theirs, device)
                ftw_gbs, torch_gbs = 2 * n * size / ftw_us / 1e3, (2 * n * size + n) / torch_us / 1e3
                cells = f"{ftw_us:.1f} ({ftw_gbs:.0f}) | {torch_us:.1f} ({torch_gbs:.0f})"
                print(f"| {shape} | {name} | {phase} | {cells} | {torch_us / ftw_us:.2f}× | {kept} |", flush=True)
    print("\n| shape | what | drawn inside µs | the pass after µs | × |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes:
        for what, inside, after in fused_arms(*SHAPES[shape], device, dtype):
            inside_us, after_us = timed_us(inside, device), timed_us(after, device)
            print(f"| {shape} | {what} | {inside_us:.1f} | {after_us:.1f} | {after_us / inside_us:.2f}× |", flush=True)


def fused_arms(tokens: int, hidden: int, inter: int, _kv: int, device, dtype):
    """(what, the kernel that draws the mask itself, what it replaced) for one step's tokens."""
    drop = Dropout(P, 1234)
    arms = []
    for group, sum_r, width in (
        ("q, k, v", 48, hidden),
        ("gate, up", 32, hidden),
        ("o", 16, hidden),
        ("down", 16, inter),
    ):
        dyb = torch.randn(sum_r, tokens, device=device, dtype=dtype)
        a_rows = torch.randn(sum_r, width, device=device, dtype=dtype)
        arms.append((
            f"dx rank-r terms, {group}",
            lambda dyb=dyb, a=a_rows: rank_terms_dropped(dyb, a, drop, max_r=64),  # the kernel whatever Σr
            lambda dyb=dyb, a=a_rows: rank_terms_dropped(dyb, a, drop, max_r=0),  # the product, then the pass
        ))  # fmt: skip
    g, u, dh = (torch.randn(tokens, inter, device=device, dtype=dtype) for _ in range(3))
    dg, du = torch.empty_like(g), torch.empty_like(u)
    arms.append((
        "SwiGLU forward + down's dropped input",
        lambda: swiglu_forward_dropped(g, u, drop),
        lambda: dropped(swiglu_forward_raw(g, u), drop),
    ))  # fmt: skip
    arms.append((
        "SwiGLU backward, h recomputed dropped",
        lambda: swiglu_backward(dh, g, u, dg, du, True, drop),
        lambda: dropped(swiglu_backward(dh, g, u, dg, du, True), drop, out=dh),
    ))  # fmt: skip
    return arms


if __name__ == "__main__":
    main()

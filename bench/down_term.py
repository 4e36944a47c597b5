"""Down's rank-r term of dh added inside the SwiGLU backward against the term written for the dx GEMM to add.

The `today` arm is the fused MLP's backward (kernels/ftw_kernels/lora.py `LoRAGatedMLP`) as it ran before
2026-12-06, and still runs past TERM_MAX_R: dh = dy·W_down + (dy·s·B)·A_down as cuBLAS's rank-r product,
written (tokens × intermediate: 235 MB a step at 8B), then the dx GEMM adding itself to it (beta 1: the same bytes
read again), then the SwiGLU backward reading dh. With LoRA's dropout on down's input
the term goes through the mask (kernels/ftw_kernels/lora_dropout.py `rank_terms_dropped`), a second draw of the
mask the SwiGLU backward draws again when it recomputes h dropped. The other arm (ftw's since 2026-12-06): the
GEMM writes dy·W_down alone and one 2-D kernel takes dh = that + the term (a rank-sized dot per tile from the
L2-resident dyb and A_down, masked from the draw it shares with h's dropout) before the SwiGLU backward's
arithmetic. Both arms return the same dg, du and h (checked before timing, to bf16's rounding: the fused arm
adds the term to the GEMM's rounded output in fp32).

    python3 bench/down_term.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/down_term.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

The kernel is ftw's (kernels/ftw_kernels/swiglu.py `swiglu_backward_term`), which the fused MLP runs up to
`TERM_MAX_R`; `--rank` times it past that. Times: bench/gpu_bench.py's `timed_us` (the GPU's time alone, the
median of 30 after 5); p 0.05.

`--tiles ROWSxWARPS,...` adds a table of the kernel's own tiling (swiglu.TERM_ROWS token rows a program, TERM_WARPS
warps): the term-inside arm at each, against today's arm, e.g. --tiles 16x8,16x16,32x16."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.gpu_bench import SHAPES, at_tilings, setup, timed_us  # noqa: E402
from ftw_kernels import swiglu  # noqa: E402
from ftw_kernels.lora_dropout import Dropout, rank_terms_dropped  # noqa: E402
from ftw_kernels.swiglu import swiglu_backward, swiglu_backward_term  # noqa: E402

P = 0.05


def fused(dy, w, dyb, a, g, u, drop: Dropout | None):
    """The alternative: dh = dy·W alone, then one kernel (the term into dh, dg and du over g and u, h over dh)."""
    return g, u, swiglu_backward_term(dy @ w, g, u, dyb, a, drop)


def today(dy, w, dyb, a, g, u, drop: Dropout | None):
    """The backward past TERM_MAX_R: the term written, the GEMM adding itself (beta 1), the SwiGLU backward."""
    dh = dyb.t() @ a if drop is None else rank_terms_dropped(dyb, a, drop)
    dh.addmm_(dy, w)
    h = swiglu_backward(dh, g, u, g, u, want_h=True, dropout=drop)
    return g, u, h


def backward_inputs(shape: str, rank: int, device, dtype):
    """(dy, W_down, dyb, A_down, g, u) of one step at `shape`: what the MLP's backward starts from."""
    tokens, hidden, inter, _kv = SHAPES[shape]
    dy = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, inter, device=device, dtype=dtype) / hidden**0.5
    dyb = torch.randn(rank, tokens, device=device, dtype=dtype) / 4
    a = torch.randn(rank, inter, device=device, dtype=dtype) / 4
    g, u = (torch.randn(tokens, inter, device=device, dtype=dtype) for _ in range(2))
    return dy, w, dyb, a, g, u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="down's LoRA rank (the kernel runs up to TERM_MAX_R)")
    parser.add_argument("--tiles", default="", help="ROWSxWARPS,... of the kernel to time besides its own")
    args, device, dtype = setup(__doc__, parser)
    rank = args.rank
    timed = []  # (shape and dropout, [the term-inside arm], today's µs, "today") for --tiles
    print("| shape | dropout | today µs | term inside µs | × | max |Δ| / max |h| |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in args.shapes:
        dy, w, dyb, a, g0, u0 = backward_inputs(shape, rank, device, dtype)
        for drop in (None, Dropout(P, 1234)):
            outs = [arm(dy, w, dyb, a, g0.clone(), u0.clone(), drop) for arm in (today, fused)]
            err = max((x.float() - y.float()).abs().max().item() for x, y in zip(*outs))
            scale = max(t.float().abs().max().item() for t in outs[0])
            g, u = g0.clone(), u0.clone()  # timed in place, as the MLP's backward runs
            today_us = timed_us(partial(today, dy, w, dyb, a, g, u, drop), device)
            fused_us = timed_us(partial(fused, dy, w, dyb, a, g, u, drop), device)
            name = "none" if drop is None else f"p {P}"
            cells = f"{today_us:.1f} | {fused_us:.1f} | {today_us / fused_us:.2f}× | {err / scale:.1e}"
            print(f"| {shape} | {name} | {cells} |", flush=True)
            timed.append((f"{shape}, dropout {name}", [partial(fused, dy, w, dyb, a, g, u, drop)], today_us, "today"))
    if args.tiles:  # the tiles split rows and columns, not a dot's sum: the same numbers at each
        at_tilings(swiglu, ("TERM_ROWS", "TERM_WARPS"), timed, args.tiles, device, "term inside")


if __name__ == "__main__":
    main()

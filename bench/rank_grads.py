"""dyb and B's grad of each LoRA projection from one read of its dy (kernels/ftw_kernels/rank_grads.py) against
cuBLAS's two GEMMs, each of which reads dy: dyb = (s·B)ᵀ·dyᵀ written into its rows of the stacked dyb, and B's
grad dyᵀ·(x·Aᵀ) in fp32 straight from the GEMM, then scaled (ftw's backward before 2026-12-06's tenth session,
and still past rank_grads.MAX_R). Per projection of a decoder layer (q, k, v, o, gate, up, down) at one step's
tokens of bench/train_throughput.py, rank 16, then the layer's sum and what it comes to over the model's layers.
Both arms' results are checked against each other before timing (dyb to bf16's rounding, B's grad fp32).

    python3 bench/rank_grads.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/rank_grads.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

`--tiles ROWSxCOLSxWARPS,...` adds the layer's sum at other tilings of the kernel (rank_grads.ROWS token rows a
program, COLS columns a step, WARPS warps), e.g. --tiles 128x64x4,256x64x8,256x32x8; `--programs-per-sm 1,2` at
grids of one and two waves of resident programs (rank_grads.PROGRAMS_PER_SM). Times: bench/gpu_bench.py's
`timed_us` (the GPU's time alone, the median of 30 after 5)."""

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

from bench.gpu_bench import LAYERS, SHAPES, at_tilings, rel_diff, setup, timed_us  # noqa: E402
from ftw_kernels import rank_grads as kernel  # noqa: E402

RANK, SCALE = 16, 2.0


def two_gemms(dy, b, xa, dyb):
    """cuBLAS's: dyb's rows, then B's grad (fp32 out of the GEMM on CUDA, as lora_products._product forms
    it), scaled."""
    torch.mm(b.t(), dy.t(), out=dyb)
    if dy.is_cuda:
        return torch.mm(dy.t(), xa, out_dtype=torch.float32).mul_(SCALE)
    return (dy.t() @ xa).float().mul_(SCALE)


def one_read(dy, b, xa, dyb):
    return kernel.rank_grads(dy, b, xa, SCALE, dyb, torch.float32)


def projections(shape: str) -> list[tuple[str, int]]:
    """(name, output width) of each LoRA projection of a decoder layer."""
    _tokens, hidden, inter, kv = SHAPES[shape]
    return [("q", hidden), ("k", kv), ("v", kv), ("o", hidden), ("gate", inter), ("up", inter), ("down", hidden)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default="", help="ROWSxCOLSxWARPS,... of the kernel to time besides its own")
    parser.add_argument("--programs-per-sm", default="", help="PROGRAMS_PER_SM,... of the kernel's grid to time")
    args, device, dtype = setup(__doc__, parser)
    print("| shape | projection | dy MB | two GEMMs µs | one read µs | × | dyb max |Δ| / max | B grad max |Δ| / max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    sums = []
    for shape in args.shapes:
        tokens = SHAPES[shape][0]
        arms, total_two, total_one = [], 0.0, 0.0
        for name, width in projections(shape):
            dy = torch.randn(tokens, width, device=device, dtype=dtype)
            b = torch.randn(width, RANK, device=device, dtype=dtype) / width**0.5
            xa = torch.randn(tokens, RANK, device=device, dtype=dtype)
            dybs = [torch.empty(RANK, tokens, device=device, dtype=dtype) for _ in range(2)]
            grads = [arm(dy, b, xa, d) for arm, d in zip((two_gemms, one_read), dybs)]
            errs = [rel_diff(*dybs), rel_diff(*grads)]
            two_us = timed_us(partial(two_gemms, dy, b, xa, dybs[0]), device)
            one_us = timed_us(partial(one_read, dy, b, xa, dybs[1]), device)
            total_two, total_one = total_two + two_us, total_one + one_us
            arms.append(partial(one_read, dy, b, xa, dybs[1]))
            mb = dy.numel() * dy.element_size() / 1e6
            cells = f"{mb:.0f} | {two_us:.1f} | {one_us:.1f} | {two_us / one_us:.2f}× | {errs[0]:.1e} | {errs[1]:.1e}"
            print(f"| {shape} | {name} | {cells} |", flush=True)
        saved_ms = (total_two - total_one) * LAYERS[shape] / 1e3
        print(f"| {shape} | **a layer** | | {total_two:.1f} | {total_one:.1f} | {total_two / total_one:.2f}× | "
              f"{saved_ms:.2f} ms a step less over {LAYERS[shape]} layers | |", flush=True)  # fmt: skip
        sums.append((shape, arms, total_two, "two GEMMs"))
    if args.tiles:
        at_tilings(kernel, ("ROWS", "COLS", "WARPS"), sums, args.tiles, device, "one read, a layer")
    if args.programs_per_sm:
        at_tilings(kernel, ("PROGRAMS_PER_SM",), sums, args.programs_per_sm, device, "one read, a layer")


if __name__ == "__main__":
    main()

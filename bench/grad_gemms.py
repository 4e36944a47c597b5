"""The LoRA adapters' grad GEMMs of one decoder layer, two ways: a bf16 product then a scale and a cast to the
fp32 adapter (ftw before 59fb3ba), and the GEMM writing fp32 itself (`torch.mm(..., out_dtype=torch.float32)`,
kernels/ftw_kernels/lora.py `_product`), then the scale. The layer bench (bench/lora_ops.py) read the second
1–2% slower per layer while whole steps read it 0.2–0.3% faster: this times each GEMM, to keep the fp32 output
only where it costs nothing.

    python3 bench/grad_gemms.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/grad_gemms.py --shapes tiny                    # the harness on CPU: the bf16 way only

Per GEMM: A's grad over a stacked input (rank rows × tokens · tokens × in) and B's (out × tokens · tokens ×
rank); bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402

RANK = 16


def gemms(hidden: int, inter: int, kv: int) -> list[tuple[str, int, int]]:
    """(name, rows of the left operand, columns of the right; the tokens are what they share) of a layer's grad
    GEMMs: A's over the stacked A's of one input, B's per projection."""
    return [
        ("A of q,k,v (stacked)", 3 * RANK, hidden),
        ("A of o", RANK, hidden),
        ("A of gate,up (stacked)", 2 * RANK, hidden),
        ("A of down", RANK, inter),
        ("B of q", hidden, RANK),
        ("B of k", kv, RANK),
        ("B of v", kv, RANK),
        ("B of o", hidden, RANK),
        ("B of gate", inter, RANK),
        ("B of up", inter, RANK),
        ("B of down", hidden, RANK),
    ]


def rows_for(shape: str, device: torch.device) -> list[tuple[str, float, float | None]]:
    tokens, hidden, inter, kv = SHAPES[shape]
    rows = []
    for name, left_rows, right_cols in gemms(hidden, inter, kv):
        # the left operand is a transposed view, as in the backward (dyb is rank × tokens; dy.t() is out × tokens)
        left = torch.randn(tokens, left_rows, device=device, dtype=torch.bfloat16).t()
        right = torch.randn(tokens, right_cols, device=device, dtype=torch.bfloat16)
        cast = timed_us(lambda: (left @ right).mul_(2.0).to(torch.float32), device)  # noqa: B023  (timed at once)
        wide = None
        if device.type == "cuda":
            wide = timed_us(lambda: torch.mm(left, right, out_dtype=torch.float32).mul_(2.0), device)  # noqa: B023
        rows.append((name, cast, wide))
    return rows


def main() -> None:
    args, device, _ = setup(__doc__)
    print("| shape | grad GEMM | bf16, scale, cast µs | fp32 out, scale µs | fp32 / cast |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes:
        rows = rows_for(shape, device)
        sums = (sum(r[1] for r in rows), sum(r[2] for r in rows) if device.type == "cuda" else None)
        for name, cast, wide in [*rows, ("a layer's sum", *sums)]:
            ratio = "-" if wide is None else f"{wide / cast:.2f}×"
            print(f"| {shape} | {name} | {cast:.1f} | {'-' if wide is None else f'{wide:.1f}'} | {ratio} |")


if __name__ == "__main__":
    main()

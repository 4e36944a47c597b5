"""The LoRA adapters' grad GEMMs of one decoder layer, two ways: a bf16 product then a scale and a cast to the
fp32 adapter (ftw before 59fb3ba), and the GEMM writing fp32 itself (`torch.mm(..., out_dtype=torch.float32)`,
kernels/ftw_kernels/lora.py `_product`), then the scale. The layer bench (bench/lora_ops.py) read the second
1–2% slower per layer while whole steps read it 0.2–0.3% faster: this times each GEMM, to keep the fp32 output
only where it costs nothing.

    python3 bench/grad_gemms.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/grad_gemms.py --shapes tiny                    # the harness on CPU: the bf16 way only

Per GEMM: A's grad over a stacked input (rank rows × tokens · tokens × in) and B's (out × tokens · tokens ×
rank); times from CUDA events, the median of 30 after 5."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {  # name → (tokens, hidden, intermediate, kv width)
    "llama-8b": (8192, 4096, 14336, 1024),
    "llama-1b": (16384, 2048, 8192, 512),
    "tiny": (256, 64, 128, 32),
}
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


HOLD_CYCLES = 5_000_000  # ~3 ms of GPU spin: longer than the host takes to queue any call timed here


def timed_us(fn, device: torch.device, repeats: int = 30, warmup: int = 5) -> float:
    """Median µs of fn on the GPU alone: the GPU is held busy while the host queues the call, so no launch
    latency is counted (in a training step the host runs ahead of the GPU the same way)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(HOLD_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def shapes_and_device(doc: str | None, default: str = "llama-8b,llama-1b") -> tuple[list[str], torch.device]:
    """The GEMM benches' command line (`--shapes`), and the device they run on (CPU: the harness alone)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=default)
    args = parser.parse_args()
    return args.shapes.split(","), torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    shapes, device = shapes_and_device(__doc__)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    print("| shape | grad GEMM | bf16, scale, cast µs | fp32 out, scale µs | fp32 / cast |")
    print("|---|---|---:|---:|---:|")
    for shape in shapes:
        rows = rows_for(shape, device)
        sums = (sum(r[1] for r in rows), sum(r[2] for r in rows) if device.type == "cuda" else None)
        for name, cast, wide in [*rows, ("a layer's sum", *sums)]:
            ratio = "-" if wide is None else f"{wide / cast:.2f}×"
            print(f"| {shape} | {name} | {cast:.1f} | {'-' if wide is None else f'{wide:.1f}'} | {ratio} |")


if __name__ == "__main__":
    main()

"""What the GEMM and kernel benches share (gemm_layouts, grad_gemms, stacked_gemms, lora_gemm, rank_expand,
swiglu_low_rank): the training benches' shapes, a timer of the GPU's time alone, and the command line."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.models import PUBLIC_SHAPES

SHAPES = {  # name → (tokens, hidden, intermediate, kv width): one step's tokens of bench/train_throughput.py
    "llama-8b": (8192, 4096, 14336, 1024),
    "llama-1b": (16384, 2048, 8192, 512),
    "tiny": (256, 64, 128, 32),  # the harness on CPU
}
LAYERS = {name: PUBLIC_SHAPES[name]["num_hidden_layers"] for name in ("llama-8b", "llama-1b")} | {"tiny": 2}
HOLD_CYCLES = 5_000_000  # ~3 ms of GPU spin: longer than the host takes to queue any call timed here


def timed_us(fn, device: torch.device, repeats: int = 30, warmup: int = 5) -> float:
    """Median µs of fn on the GPU alone: the GPU is held busy while the host queues the call, so no launch
    latency is counted (in a training step the host runs ahead of the GPU the same way). Wall clock on CPU."""
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


def setup(doc: str | None, parser: argparse.ArgumentParser | None = None):
    """(arguments with `shapes` as a list, the device, its dtype: bf16 on the GPU, fp32 for the CPU harness),
    after printing what runs them. `parser`: a bench's own options, `--shapes` added here."""
    parser = parser or argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-8b,llama-1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()
    args.shapes = args.shapes.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    return args, device, torch.bfloat16 if device.type == "cuda" else torch.float32


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y| / max |y|: how two arms' results differ."""
    return ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()


def at_tilings(module, names: tuple[str, ...], rows, tiles: str, device: torch.device, what: str) -> None:
    """A table of each row's arms (their µs summed) at each tiling "AxBxC" of `module`'s constants `names` (e.g. a
    kernel's tile sides and warps, read at each call), against the row's baseline µs; the constants restored after.
    rows: (shape, [arm, ...], baseline µs, the baseline's name)."""
    print(f"\n| shape | {' × '.join(n.lower() for n in names)} | {what} µs | × baseline |")
    print("|---|---|---:|---:|")
    own = tuple(getattr(module, n) for n in names)
    try:
        for shape, arms, baseline_us, baseline in rows:
            for tile in tiles.split(","):
                for name, value in zip(names, tile.split("x")):
                    setattr(module, name, int(value))
                us = sum(timed_us(arm, device) for arm in arms)
                print(f"| {shape} | {tile} | {us:.1f} | {baseline_us / us:.2f}× {baseline} |", flush=True)
    finally:
        for name, value in zip(names, own):
            setattr(module, name, value)

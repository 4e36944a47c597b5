"""QLoRA's per-matmul dequantisation: bitsandbytes' `dequantize_4bit` against ftw's one Triton kernel
(kernels/ftw_kernels/dequant_4bit.py), at the Llama-3.1-8B and Llama-3.2-1B projections' shapes (one GPU):

    python bench/dequant.py [--blocksize 64] [--flat]

Each weight is quantised as `load_in_4bit` stores it (nf4, nested statistics unless --flat, bf16) and
dequantised into one preallocated buffer, as kernels/ftw_kernels/qlora.py does before each matmul.
Per arm and shape: GPU ms per call (CUDA events over 50 calls after 5) and host µs per call (the time to
issue 50 calls, before the synchronisation: what the training step's Python pays); it stops if the two arms'
bits differ. The last row of each model sums one decoder layer's seven weights.
"""

from __future__ import annotations

import argparse
import time

SHAPES = {
    "8b": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
    "1b": {"q/o": (2048, 2048), "k/v": (512, 2048), "gate/up": (8192, 2048), "down": (2048, 8192)},
}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}  # weights of each shape in one decoder layer


def timed(fn, calls: int = 50) -> tuple[float, float]:
    """(GPU ms per call, host µs per call)."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls, host


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--flat", action="store_true", help="no nested (double-quantised) statistics")
    a = ap.parse_args()
    print(f"nf4, blocksize {a.blocksize}, {'flat' if a.flat else 'nested'} statistics, bf16 out")
    print(f"device: {torch.cuda.get_device_name()}")
    print(
        "| model | weight (out × in) | bitsandbytes GPU ms | ftw GPU ms | × | bitsandbytes host µs | ftw host µs | × |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, shapes in SHAPES.items():
        layer = {"bnb": [0.0, 0.0], "ftw": [0.0, 0.0]}
        for name, shape in shapes.items():
            bnb, ftw = compare(shape, a.blocksize, not a.flat)
            for arm, (gpu, host) in (("bnb", bnb), ("ftw", ftw)):
                layer[arm][0] += PER_LAYER[name] * gpu
                layer[arm][1] += PER_LAYER[name] * host
            print(
                f"| {model} | {name} {shape[0]} × {shape[1]} | {bnb[0]:.3f} | {ftw[0]:.3f} | {bnb[0] / ftw[0]:.2f}× "
                f"| {bnb[1]:.1f} | {ftw[1]:.1f} | {bnb[1] / ftw[1]:.2f}× |"
            )
        (bg, bh), (fg, fh) = layer["bnb"], layer["ftw"]
        print(
            f"| {model} | one layer's 7 weights | {bg:.3f} | {fg:.3f} | {bg / fg:.2f}× | {bh:.1f} | {fh:.1f} "
            f"| {bh / fh:.2f}× |"
        )


def compare(shape: tuple[int, int], blocksize: int, nested: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """(bitsandbytes' timings, ftw's) for one weight; raises if their bits differ."""
    import bitsandbytes.functional as bnbf
    import torch

    from ftw_kernels.dequant_4bit import dequantise_into

    w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    packed.quant_state = state
    out_bnb, out_ftw = torch.empty_like(w), torch.empty_like(w)
    bnb = timed(lambda: bnbf.dequantize_4bit(packed, state, out=out_bnb))
    ftw = timed(lambda: dequantise_into(packed, out_ftw))
    if not torch.equal(out_bnb, out_ftw):
        raise SystemExit(f"{shape}: ftw's dequantisation differs from bitsandbytes'")
    return bnb, ftw


if __name__ == "__main__":
    main()

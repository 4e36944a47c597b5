"""QLoRA's 4-bit dequantisation: bitsandbytes' `dequantize_4bit(…, out=)` against ftw's one Triton kernel
(kernels/ftw_kernels/dequant.py) on the weights of the Llama 1B and 8B shapes (nf4, double quantisation, bf16).

    PYTHONPATH=$PWD:$PWD/kernels python3 bench/dequant.py [--out DIR]     # on a GPU with bitsandbytes

Per weight and call: GPU time (CUDA events over `--calls` back-to-back calls), host time (the time to issue
them, the queue never full: what a host-bound step pays) and whether the two outputs are bit-equal. Prints a
table with the ratios bitsandbytes / ftw, and writes OUT/dequant.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]

# (out, in) of q, k (= v), o, gate (= up), down per shape
SHAPES = {
    "llama-1b": {"q": (2048, 2048), "k": (512, 2048), "gate": (8192, 2048), "down": (2048, 8192)},
    "llama-8b": {"q": (4096, 4096), "k": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336)},
}


def timed(fn, calls: int) -> tuple[float, float]:
    """(GPU µs per call, host µs per call)."""
    import torch

    for _ in range(3):
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
    return start.elapsed_time(end) * 1e3 / calls, host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from ftw_kernels import dequant

    rows = []
    for shape, weights in SHAPES.items():
        for name, (out_f, in_f) in weights.items():
            torch.manual_seed(0)
            w = bnb.nn.Params4bit(
                torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02,
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
                quant_storage=torch.bfloat16,
            ).to("cuda")
            ours, theirs = (torch.empty(out_f, in_f, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            bnb_gpu, bnb_host = timed(lambda w=w, out=theirs: dequantize_4bit(w, w.quant_state, out=out), a.calls)
            ftw_gpu, ftw_host = timed(lambda w=w, out=ours: dequant.dequantize_4bit(w, out), a.calls)
            rows.append(
                {
                    "shape": shape,
                    "weight": name,
                    "values": out_f * in_f,
                    "bnb_gpu_us": bnb_gpu,
                    "ftw_gpu_us": ftw_gpu,
                    "bnb_host_us": bnb_host,
                    "ftw_host_us": ftw_host,
                    "bit_equal": bool(torch.equal(ours, theirs)),
                }
            )
    print(
        f"{'shape':9} {'weight':6} {'values':>11} {'GPU µs bnb':>10} {'ftw':>7} {'bnb/ftw':>7} "
        f"{'host µs bnb':>11} {'ftw':>6} {'bnb/ftw':>7}  bit-equal"
    )
    for r in rows:
        print(
            f"{r['shape']:9} {r['weight']:6} {r['values']:>11,} {r['bnb_gpu_us']:>10.1f} {r['ftw_gpu_us']:>7.1f} "
            f"{r['bnb_gpu_us'] / r['ftw_gpu_us']:>6.2f}× {r['bnb_host_us']:>11.1f} {r['ftw_host_us']:>6.1f} "
            f"{r['bnb_host_us'] / r['ftw_host_us']:>6.2f}×  {r['bit_equal']}"
        )
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "dequant.json").write_text(
            json.dumps({"rows": rows, "device": torch.cuda.get_device_name()}, indent=1)
        )


if __name__ == "__main__":
    main()

"""What a GEMM call costs the host the first time a process meets its shape, against a shape it has met: every
padding-free step of unpacked rows brings a token count the process has not seen (docs/benchmarks.md, "fourteenth
session"): cuBLASLt chooses an algorithm for each new shape, and the driver loads a kernel the first time one runs
(CUDA_MODULE_LOADING=LAZY, CUDA's default), which can wait for the device. Times `torch.mm` and `addmm_` launches
(host only, no sync inside the timed loop) at the 1B and 8B layers' shapes, over token counts never seen and over
one seen. Before each count's calls the device is given a spin kernel (~20 ms) so that the queue is busy, as in a
training step: a launch that waits for the device then shows as thousands of µs, not a few.

    python bench/new_shapes.py                   # on a GPU (a CPU run only checks that it runs)
    CUDA_MODULE_LOADING=EAGER python bench/new_shapes.py --shapes llama-8b --counts 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
import torch  # noqa: E402

from bench.models import SHAPES  # noqa: E402


def gemms(name: str) -> list[tuple[int, int, bool]]:
    """(in, out, accumulate) of the shape's decoder layer's forward and dx GEMMs: q, k/v, o, gate/up, down, their dx."""
    shape = SHAPES[name]
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(hidden, hidden, False), (hidden, kv, False), (hidden, hidden, True), (hidden, inter, False),
            (inter, hidden, True), (hidden, hidden, False), (kv, hidden, True), (hidden, inter, False),
            (inter, hidden, False)]  # fmt: skip


def host_us(device: torch.device, dtype: torch.dtype, shapes: list, counts: list[int]) -> list[float]:
    """µs of host time a GEMM call, each count's calls once (a layer's GEMMs at that many tokens)."""
    weights = {(k, n): torch.randn(k, n, device=device, dtype=dtype) for k, n, _ in shapes}
    largest = max(counts)  # inputs and outputs are sliced by rows only: contiguous, as the step's are
    xs = {k: torch.randn(largest, k, device=device, dtype=dtype) for k, _, _ in shapes}
    outs = {n: torch.zeros(largest, n, device=device, dtype=dtype) for _, n, _ in shapes}
    each = []
    for tokens in counts:
        if device.type == "cuda":
            torch.cuda._sleep(40_000_000)  # a busy queue: a launch that waits for the device shows
        start = time.perf_counter()
        for k, n, accumulate in shapes:
            a, y = xs[k][:tokens], outs[n][:tokens]
            if accumulate:
                y.addmm_(a, weights[(k, n)])
            else:
                torch.mm(a, weights[(k, n)], out=y)
        each.append((time.perf_counter() - start) / len(shapes) * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize()  # between counts, outside the timed launches
    return each


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-1b,llama-8b")
    ap.add_argument("--counts", type=int, default=100, help="new token counts to time")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print("| shape | µs a GEMM call, new token counts (median) | the same count again (median) | × |")
    print("|---|---:|---:|---:|")
    for name in a.shapes.split(","):
        shapes = gemms(name)
        host_us(device, dtype, shapes, [4096] * 3)  # library loading, the first call's own set-up
        fresh = list(range(2001, 2001 + 37 * a.counts, 37))  # counts this process has not met
        new = statistics.median(host_us(device, dtype, shapes, fresh))
        seen = statistics.median(host_us(device, dtype, shapes, [fresh[len(fresh) // 2]] * a.counts))
        print(f"| {name} | {new:.1f} | {seen:.1f} | {new / seen:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

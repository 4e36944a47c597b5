"""What a GEMM call costs the host the first time a process meets its shape, against a shape it has met: every
padding-free step of unpacked rows brings a token count the process has not seen (docs/benchmarks.md, "fourteenth
session" and "fifteenth session"). Times `torch.mm` and `addmm_` launches (host only, no sync inside the timed calls)
at the 1B and 8B layers' shapes, over token counts never seen and over one seen. Before each timed call the device
is given a spin kernel (~20 ms), so that the queue is busy, as in a training step: a launch that waits for the device
then shows as thousands of µs, not a few.

The first table times a decoder layer's nine forward and dx GEMMs together, a new count each round; `--by-gemm` gives
each GEMM its own row (each with counts of its own, so that every call is its shape's first), which names the shapes
that wait; `--profile` runs one round of new counts under torch.profiler and lists the host's calls by their own time,
CUDA's runtime and driver calls among them, which names the call that waits. `--swept` first calls every GEMM at every
even count of the timed range, then times odd counts, still new: if they no longer wait, what a new count costs is
loading the kernel the library picks for it (once a process), not the count itself.

    python bench/new_shapes.py                   # on a GPU (a CPU run only checks that it runs)
    python bench/new_shapes.py --shapes llama-1b --by-gemm --profile --swept
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

SPIN_CYCLES = 40_000_000  # ~20 ms of a GPU's clock: longer than any GEMM timed here


def gemms(name: str) -> list[tuple[int, int, bool]]:
    """(in, out, accumulate) of the shape's decoder layer's forward and dx GEMMs: q, k/v, o, gate/up, down, their dx."""
    shape = SHAPES[name]
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(hidden, hidden, False), (hidden, kv, False), (hidden, hidden, True), (hidden, inter, False),
            (inter, hidden, True), (hidden, hidden, False), (kv, hidden, True), (hidden, inter, False),
            (inter, hidden, False)]  # fmt: skip


class Gemms:
    """The GEMMs' operands at up to `largest` tokens; inputs and outputs are sliced by rows only: contiguous, as the
    step's are."""

    def __init__(self, device: torch.device, dtype: torch.dtype, shapes: list, largest: int):
        self.device = device
        self.weights = {(k, n): torch.randn(k, n, device=device, dtype=dtype) for k, n, _ in shapes}
        self.xs = {k: torch.randn(largest, k, device=device, dtype=dtype) for k, _, _ in shapes}
        self.outs = {n: torch.zeros(largest, n, device=device, dtype=dtype) for _, n, _ in shapes}

    def call(self, tokens: int, k: int, n: int, accumulate: bool) -> None:
        a, y = self.xs[k][:tokens], self.outs[n][:tokens]
        if accumulate:
            y.addmm_(a, self.weights[(k, n)])
        else:
            torch.mm(a, self.weights[(k, n)], out=y)

    def busy(self) -> None:
        """The device's queue holds a spin kernel when the next call is launched (nothing to wait for on a CPU)."""
        if self.device.type == "cuda":
            torch.cuda._sleep(SPIN_CYCLES)

    def settle(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # between rounds, outside the timed calls

    def round_us(self, tokens: int, shapes: list) -> float:
        """µs of host time a call, `shapes`' calls at `tokens` launched behind one spin kernel."""
        self.busy()
        start = time.perf_counter()
        for k, n, accumulate in shapes:
            self.call(tokens, k, n, accumulate)
        seconds = time.perf_counter() - start
        self.settle()
        return seconds / len(shapes) * 1e6


def fresh_counts(rounds: int, offset: int = 0) -> list[int]:
    """`rounds` token counts no earlier round of this process met (`offset` keeps groups of them apart)."""
    return list(range(2001 + 2 * offset, 2001 + 2 * offset + 38 * rounds, 38))  # odd; offsets < 19 apart


def swept_row(g: Gemms, name: str, rounds: int) -> str:
    """`layer_row` after every GEMM has run at every even count from below the timed range to above it."""
    shapes = gemms(name)
    fresh = fresh_counts(rounds, offset=11)
    for t in range(fresh[0] - 1, fresh[-1] + 2, 2):
        for k, n, accumulate in shapes:
            g.call(t, k, n, accumulate)
    g.settle()
    new = statistics.median(g.round_us(t, shapes) for t in fresh)
    seen = statistics.median(g.round_us(fresh[len(fresh) // 2], shapes) for _ in range(rounds))
    return f"| {name}, after every even count | {new:.1f} | {seen:.1f} | {new / seen:.2f}× |"


def layer_row(g: Gemms, name: str, rounds: int) -> str:
    shapes = gemms(name)
    g.round_us(4096, shapes)  # library loading, the first call's own set-up
    fresh = fresh_counts(rounds)
    new = statistics.median(g.round_us(t, shapes) for t in fresh)
    seen = statistics.median(g.round_us(fresh[len(fresh) // 2], shapes) for _ in range(rounds))
    return f"| {name} | {new:.1f} | {seen:.1f} | {new / seen:.2f}× |"


def gemm_rows(g: Gemms, name: str, rounds: int) -> list[str]:
    """A row per distinct GEMM of the layer, each call its shape's first at its count."""
    rows = []
    for i, (k, n, accumulate) in enumerate(dict.fromkeys(gemms(name))):
        one = [(k, n, accumulate)]
        fresh = fresh_counts(rounds, offset=i + 1)  # apart from every other row's counts
        new = statistics.median(g.round_us(t, one) for t in fresh)
        seen = statistics.median(g.round_us(fresh[0], one) for _ in range(rounds))
        op = "addmm_" if accumulate else "mm"
        rows.append(f"| {name} | {op} {k}→{n} | {new:.1f} | {seen:.1f} | {new / seen:.2f}× |")
    return rows


def profile_table(g: Gemms, name: str, rounds: int) -> str:
    """One round of new counts under torch.profiler: the host's calls by their own time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if g.device.type == "cuda" else [])
    shapes = gemms(name)
    with profile(activities=acts) as prof:
        for t in fresh_counts(rounds, offset=9):
            g.round_us(t, shapes)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-1b,llama-8b")
    ap.add_argument("--counts", type=int, default=100, help="new token counts to time (rounds)")
    ap.add_argument("--by-gemm", action="store_true", help="a row per GEMM of the layer")
    ap.add_argument("--profile", action="store_true", help="one round of new counts under torch.profiler")
    ap.add_argument("--swept", action="store_true", help="new odd counts after every even one of their range")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = a.shapes.split(",")
    largest = max(fresh_counts(a.counts, offset=11)[-1] + 1, 4096)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print("| shape | µs a GEMM call, new token counts (median) | the same count again (median) | × |")
    print("|---|---:|---:|---:|")
    for name in names:
        print(layer_row(Gemms(device, dtype, gemms(name), largest), name, a.counts))
    if a.by_gemm:
        print("\n| shape | GEMM (in→out) | µs, new token counts (median) | the same count again (median) | × |")
        print("|---|---|---:|---:|---:|")
        for name in names:
            print("\n".join(gemm_rows(Gemms(device, dtype, gemms(name), largest), name, a.counts)))
    if a.profile:
        for name in names:
            print(f"\n{name}: one round of new counts under torch.profiler, by the host's own time\n")
            print(profile_table(Gemms(device, dtype, gemms(name), largest), name, min(a.counts, 20)))
    if a.swept:  # last: the kernels it loads would hide the other tables' waits
        print("\n| shape | µs a GEMM call, new (odd) token counts (median) | the same count again (median) | × |")
        print("|---|---:|---:|---:|")
        for name in names:
            print(swept_row(Gemms(device, dtype, gemms(name), largest), name, a.counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The 8B LoRA step's GEMMs under the power cap, as torch's cuBLAS runs them against every algorithm cuBLASLt's
heuristic offers for the same shape. The question: the 8B step is ~75% these GEMMs and holds the GPU at its
700 W cap (docs/benchmarks.md, "ninth session"), so its time is their energy over 700 W; does another
algorithm (tile, cluster, stages) do the same work for less energy, i.e. run faster when the clock is set by
the cap rather than by the GEMM alone?

    python3 bench/gemm_algos.py --shapes llama-8b [--seconds 0.3] [--algos 16]    # on a GPU (~2 min)

Each arm runs back to back for `--seconds` after a warm-up of a third of that, so the GPU stays at its power
cap through the whole run (bench/gpu_bench.py's `timed_us` instead times single calls after an idle spin,
which the cap never reaches). Per GEMM of a decoder layer (forward over the bordered weights, dx with beta 1
onto the rank-r terms, as kernels/ftw_kernels/lora_products.py calls them) and of the output head:
  torch       torch.mm / addmm_, as ftw calls them (cuBLAS's default heuristic), timed before and after the
              Lt arms: their mean is the baseline
  torch-lt    the same with torch.backends.cuda.preferred_blas_library("cublaslt")
  lt #i       cuBLASLt's i-th heuristic algorithm (ctypes over the libcublasLt torch loaded), its tile, stages
              and cluster ids
with the SM MHz and W nvidia-smi sampled while each arm ran. Last, the step's GEMM time summed over the
model's layers: torch's against each GEMM's best arm."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_bench import LAYERS, SHAPES, setup
from bench.models import PUBLIC_SHAPES  # noqa: E402
from worker.train.gpu_clocks import GpuClocks, gpu_id  # noqa: E402

RANK = 16
# cublasLt.h
COMPUTE_32F, R_32F, R_16BF = 68, 0, 14
DESC_TRANSA, DESC_TRANSB, PREF_MAX_WORKSPACE = 3, 4, 1
OP_N, OP_T = 0, 1
CONFIG_IDS = {"tile": 1, "splitk": 2, "stages": 6, "cluster": 8}  # cublasLtMatmulAlgoConfigAttributes_t
WORKSPACE = 32 << 20


class HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


@dataclass(frozen=True)
class Gemm:
    """out[m, n] (+)= a[m, k] · b[k, n]; `tn`: b is a weight stored n × k (the forward's x·Wᵀ), else k × n
    (dx = dy·W). `count`: how many a layer runs (0 with `head`: once a step)."""

    name: str
    m: int
    n: int
    k: int
    tn: bool
    beta: int
    count: int


def step_gemms(shape: str) -> list[Gemm]:
    tokens, hidden, inter, kv = SHAPES[shape]
    vocab = PUBLIC_SHAPES[shape]["vocab_size"]
    return [
        # forward over the bordered weights: each projection's K is its input plus the rank columns up to its own
        Gemm("q fwd", tokens, hidden, hidden + RANK, True, 0, 1),
        Gemm("k,v fwd", tokens, kv, hidden + 3 * RANK, True, 0, 2),
        Gemm("o fwd (beta 1)", tokens, hidden, hidden, True, 1, 1),
        Gemm("gate,up fwd", tokens, inter, hidden + 2 * RANK, True, 0, 2),
        Gemm("down fwd (beta 1)", tokens, hidden, inter, True, 1, 1),
        Gemm("q,o dx", tokens, hidden, hidden, False, 1, 2),
        Gemm("k,v dx", tokens, hidden, kv, False, 1, 2),
        Gemm("gate,up dx", tokens, hidden, inter, False, 1, 2),
        Gemm("down dx", tokens, inter, hidden, False, 1, 1),
        Gemm("head fwd", tokens, vocab, hidden, True, 0, 0),
        Gemm("head dx", tokens, hidden, vocab, False, 0, 0),
    ]


@contextlib.contextmanager
def blas_library(name: str):
    """torch's matmuls through `name` ("cublas", "cublaslt") inside; the backend before restored after."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def loaded_cublaslt() -> ctypes.CDLL:
    """The libcublasLt this process's torch loaded (after one matmul), so both arms run the same library."""
    a = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
    with blas_library("cublaslt"):
        (a @ a).sum().item()
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libcublasLt" in line})
    if not paths:
        raise SystemExit("libcublasLt is not loaded in this process")
    return ctypes.CDLL(paths[0])


class CublasLt:
    def __init__(self):
        self.lib = loaded_cublaslt()
        self.handle = ctypes.c_void_p()
        self._check("cublasLtCreate", ctypes.byref(self.handle))
        self.workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")

    def _check(self, fn: str, *args) -> None:
        status = getattr(self.lib, fn)(*args)
        if status != 0:
            raise RuntimeError(f"{fn} returned cuBLAS status {status}")

    def _layout(self, rows: int, cols: int, ld: int, dtype: int = R_16BF) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        self._check(
            "cublasLtMatrixLayoutCreate",
            ctypes.byref(layout),
            dtype,
            ctypes.c_uint64(rows),
            ctypes.c_uint64(cols),
            ctypes.c_int64(ld),
        )
        return layout

    def plan(self, g: Gemm):
        """(matmul descriptor, layouts of A, B, C) of out = a·b in cuBLAS's column-major terms: outᵀ = bᵀ·aᵀ,
        so cuBLAS's A is our b and its B our a."""
        desc = ctypes.c_void_p()
        self._check("cublasLtMatmulDescCreate", ctypes.byref(desc), COMPUTE_32F, R_32F)
        for attr, op in ((DESC_TRANSA, OP_T if g.tn else OP_N), (DESC_TRANSB, OP_N)):
            value = ctypes.c_int32(op)
            self._check("cublasLtMatmulDescSetAttribute", desc, attr, ctypes.byref(value), ctypes.c_size_t(4))
        a_layout = self._layout(g.k, g.n, g.k) if g.tn else self._layout(g.n, g.k, g.n)
        b_layout = self._layout(g.k, g.m, g.k)
        c_layout = self._layout(g.n, g.m, g.n)
        return desc, a_layout, b_layout, c_layout

    def algos(self, plan, count: int) -> list[HeuristicResult]:
        pref = ctypes.c_void_p()
        self._check("cublasLtMatmulPreferenceCreate", ctypes.byref(pref))
        size = ctypes.c_uint64(WORKSPACE)
        self._check(
            "cublasLtMatmulPreferenceSetAttribute", pref, PREF_MAX_WORKSPACE, ctypes.byref(size), ctypes.c_size_t(8)
        )
        results = (HeuristicResult * count)()
        found = ctypes.c_int(0)
        desc, a, b, c = plan
        self._check(
            "cublasLtMatmulAlgoGetHeuristic", self.handle, desc, a, b, c, c, pref, count, results, ctypes.byref(found)
        )
        return [r for r in results[: found.value] if r.state == 0]

    def label(self, result: HeuristicResult) -> str:
        parts = []
        for name, attr in CONFIG_IDS.items():
            need = ctypes.c_size_t(0)
            self.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(result.algo), attr, None, 0, ctypes.byref(need))
            value = ctypes.c_uint64(0)
            if (
                0 < need.value <= 8
                and self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                    ctypes.byref(result.algo), attr, ctypes.byref(value), need, ctypes.byref(need)
                )
                == 0
            ):
                parts.append(f"{name} {value.value}")
        return ", ".join(parts) + f", ws {result.workspace_size >> 10} KiB, waves {result.waves:.2f}"

    def matmul(
        self, plan, result: HeuristicResult, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, beta: int
    ) -> None:
        desc, a_layout, b_layout, c_layout = plan
        alpha_f, beta_f = ctypes.c_float(1.0), ctypes.c_float(float(beta))
        self._check(
            "cublasLtMatmul",
            self.handle,
            desc,
            ctypes.byref(alpha_f),
            ctypes.c_void_p(b.data_ptr()),
            a_layout,
            ctypes.c_void_p(a.data_ptr()),
            b_layout,
            ctypes.byref(beta_f),
            ctypes.c_void_p(out.data_ptr()),
            c_layout,
            ctypes.c_void_p(out.data_ptr()),
            c_layout,
            ctypes.byref(result.algo),
            ctypes.c_void_p(self.workspace.data_ptr()),
            ctypes.c_size_t(WORKSPACE),
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
        )


def sustained_us(fn, seconds: float, clocks: GpuClocks) -> tuple[float, float, float]:
    """(µs a call, SM MHz, W) over `seconds` of back-to-back calls, after a third of that as warm-up."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    end.synchronize()
    once_s = max(start.elapsed_time(end) / 1e3, 1e-5)
    for _ in range(max(1, int(seconds / 3 / once_s))):
        fn()
    calls = max(3, int(seconds / once_s))
    first = len(clocks.samples)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    samples = clocks.samples[first:] or clocks.samples[-1:] or [(0.0,) * 6]
    mhz = sum(s[0] for s in samples) / len(samples)
    watts = sum(s[2] for s in samples) / len(samples)
    return start.elapsed_time(end) * 1e3 / calls, mhz, watts


def bench_gemm(g: Gemm, args, lt: CublasLt, clocks: GpuClocks) -> tuple[float, float]:
    """Prints one GEMM's arms; returns (torch's µs, the best arm's µs)."""
    a = torch.randn(g.m, g.k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(g.n, g.k, device="cuda", dtype=torch.bfloat16).mul_(0.02)
    b = weight.t() if g.tn else weight.t().contiguous()  # k × n either way; the weight's storage differs
    out = torch.zeros(g.m, g.n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * g.m * g.n * g.k

    def torch_arm():
        if g.beta:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)

    def row(arm: str, measured, base_us: float) -> None:
        us, mhz, watts = measured
        print(
            f"| {g.name} ({g.m}×{g.n}×{g.k}) | {arm} | {us:.1f} | {flops / us / 1e6:.0f} | {mhz:.0f} / {watts:.0f} "
            f"| {base_us / us:.3f}× |",
            flush=True,
        )

    before = sustained_us(torch_arm, args.seconds, clocks)
    with blas_library("cublaslt"):
        lt_default = sustained_us(torch_arm, args.seconds, clocks)
    plan = lt.plan(g)
    start = out.clone()
    torch_arm()
    ref = out.clone()
    arms = []
    for i, result in enumerate(lt.algos(plan, args.algos)):
        out.copy_(start)
        lt.matmul(plan, result, a, b, out, g.beta)  # the algorithm computes what torch does
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        if err > 2e-2:
            print(f"| {g.name} | lt #{i} ({lt.label(result)}) | differs from torch by {err:.2e} | | | |")
            continue
        run = partial(lt.matmul, plan, result, a, b, out, g.beta)
        arms.append((f"lt #{i} ({lt.label(result)})", sustained_us(run, args.seconds, clocks)))
    after = sustained_us(torch_arm, args.seconds, clocks)
    base = (before[0] + after[0]) / 2
    for name, measured in [("torch (before)", before), ("torch-lt", lt_default), *arms, ("torch (after)", after)]:
        row(name, measured, base)
    return base, min([before[0], after[0], lt_default[0], *(m[0] for _, m in arms)])


def bench(shape: str, args, lt: CublasLt, clocks: GpuClocks) -> None:
    """Each GEMM's arms, then the step's GEMM time: torch's against each GEMM's best arm."""
    print(f"\n{shape}: tokens × out × in, µs a call at the power cap (SM MHz / W while it ran)\n")
    print("| GEMM | arm | µs | TFLOP/s | SM MHz / W | × torch |")
    print("|---|---|---:|---:|---|---:|")
    torch_ms = best_ms = 0.0
    for g in step_gemms(shape):
        base, best = bench_gemm(g, args, lt, clocks)
        calls = g.count * LAYERS[shape] or 1
        torch_ms += calls * base / 1e3
        best_ms += calls * best / 1e3
        torch.cuda.empty_cache()
    print(
        f"\n{shape}: the step's GEMMs, torch {torch_ms:.1f} ms, each one's best arm {best_ms:.1f} ms "
        f"({torch_ms / best_ms:.3f}×)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="each arm's timed run (after a third as warm-up)")
    parser.add_argument("--algos", type=int, default=16, help="cuBLASLt's heuristic algorithms tried per GEMM")
    args, device, _ = setup(__doc__, parser)
    if device.type != "cuda":
        raise SystemExit("cuBLASLt's algorithms need a CUDA GPU")
    clocks = GpuClocks(gpu_id(torch.cuda.current_device()), period_ms=50)
    clocks.start()
    lt = CublasLt()
    try:
        for shape in args.shapes:
            bench(shape, args, lt, clocks)
    finally:
        clocks.stop()


if __name__ == "__main__":
    main()

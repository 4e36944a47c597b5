"""A LoRA projection's forward as one Triton GEMM: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with the rank-r term added to the
accumulator in the epilogue (a rank-sized dot per output tile from x·Aᵀ and B, which stay in L2), against
cuBLAS as ftw runs it (the term written first, the base GEMM adding itself through its beta) and cuBLAS's base
GEMM alone (no LoRA: the floor). bench/stacked_gemms.py measured the term costing ftw's forward 9–33% over the
base GEMM alone; this asks whether a GEMM that carries the term for free beats cuBLAS's. Found (docs/benchmarks.md):
0.95–1.09× cuBLAS as ftw calls it, no better than a bordered weight: not built.

    python3 bench/lora_gemm.py --shapes llama-8b,llama-1b      # on a GPU (< 60 s)

Kernel: persistent (one program per SM), TMA loads of x's and W's tiles (both K-major: the wgmma layout),
grouped tile order so W's tiles stay in L2; the term is bench/swiglu_low_rank.py's `_with_term`. Times:
bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5); per projection, the best
configuration whose result is right."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gemm_layouts import CONFIGS, tile_origin  # noqa: E402  (the Triton GEMM configurations tried there)
from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402
from bench.swiglu_low_rank import _with_term  # noqa: E402  (a tile plus s·XA[rows]·B[cols]ᵀ)

RANK, SCALE = 16, 2.0


@triton.jit
def _lora_tn_gemm(
    x_desc, w_desc, c_desc, XA, B, M, N, scale,
    K: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
):  # fmt: skip
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    while tile < tiles_m * tiles_n:  # persistent: one program per SM
        off_m, off_n = tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
            a = x_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        m, n = off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N)
        acc = _with_term(acc, m, n, M, N, XA, R, B, scale, R, "native")  # the tile's rank-sized dot
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))
        tile += PROGRAMS


def lora_linear(
    x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scale: float, config
) -> torch.Tensor:
    block_m, block_n, block_k, group_m, stages, warps = config
    (tokens, width), out = x.shape, w.shape[0]
    y = torch.empty(tokens, out, device=x.device, dtype=x.dtype)
    programs = min(
        torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4,
        triton.cdiv(tokens, block_m) * triton.cdiv(out, block_n),
    )
    _lora_tn_gemm[(programs,)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]), TensorDescriptor.from_tensor(w, [block_n, block_k]),
        TensorDescriptor.from_tensor(y, [block_m, block_n]), xa, b, tokens, out, scale,
        K=width, R=xa.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, PROGRAMS=programs,
        num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return y


def projection_row(tokens: int, out: int, width: int) -> dict:
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[-1] ** 0.5

    x, w, a, b = rand(tokens, width), rand(out, width), rand(RANK, width), rand(out, RANK)
    xa = x @ a.t()
    expected = (x.float() @ w.float().t()) + SCALE * (xa.float() @ b.float().t())
    cublas = timed_us(lambda: (x @ a.t() @ b.t()).addmm_(x, w.t(), beta=SCALE), x.device)
    floor = timed_us(lambda: x @ w.t(), x.device)
    best, best_config = float("inf"), None
    for config in CONFIGS:
        try:
            got = lora_linear(x, w, xa, b, SCALE, config)
            error = ((got.float() - expected).norm() / expected.norm()).item()
            if error > 1e-2:
                print(f"{config}: relative error {error:.3g}, skipped")
                continue
            us = timed_us(lambda: lora_linear(x, w, x @ a.t(), b, SCALE, config), x.device)  # noqa: B023
        except Exception as exc:  # a configuration this GPU cannot compile (shared memory)
            print(f"{config}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if us < best:
            best, best_config = us, config
    flops = 2 * tokens * out * width
    return dict(cublas=cublas, floor=floor, triton=best, config=best_config, tflops=flops / best / 1e6)


def main() -> None:
    args, _, _ = setup(__doc__)
    print(f"triton {triton.__version__}")
    print(
        "| shape | projection | cuBLAS as ftw µs | cuBLAS base alone µs | Triton LoRA GEMM µs (TFLOP/s) | × ftw "
        "| config |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for shape in args.shapes:
        tokens, hidden, inter, kv = SHAPES[shape]
        for name, out, width in [
            ("q, o", hidden, hidden), ("k, v", kv, hidden), ("gate, up", inter, hidden), ("down", hidden, inter)
        ]:  # fmt: skip
            r = projection_row(tokens, out, width)
            print(
                f"| {shape} | {name} | {r['cublas']:.1f} | {r['floor']:.1f} | {r['triton']:.1f} ({r['tflops']:.0f}) "
                f"| {r['cublas'] / r['triton']:.2f}× | {r['config']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""The backward's dx GEMMs (dy·W, W stored out × in), the question being whether their layout costs time: in
a profiled 8B LoRA step they ran ~15% slower than the forward's x·Wᵀ of the same sizes (cuBLAS's "NN" against
"TN"). This prints, per dx a decoder layer sums, cuBLAS as ftw calls it (an addmm per weight into dx), cuBLAS
on a transposed copy of each W (TN), what transposing the W's costs, and a Triton GEMM on the NN layout
(below: persistent, TMA loads, the projections of one input as segments of one K loop, dx's rank-r terms added
in its epilogue), the best of its configurations.

Found on an H200 (docs/benchmarks.md): in isolation cuBLAS runs both layouts alike (684–717 TFLOP/s on the 8B
shapes), and the Triton kernel beats it only on gate+up (1.04×), losing 4–25% elsewhere. The training step's
slower dx GEMMs come from the power cap (bench/train_throughput.py's SM MHz / W), not the layout: ftw keeps
cuBLAS.

    python3 bench/gemm_layouts.py --shapes llama-8b,llama-1b [--json PATH]

Times: bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5); ratios against
cuBLAS in the same run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402


def groups(hidden: int, inter: int, kv: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, [(out, in) of each weight]) of each dx a LoRA layer's backward sums: dx = rank-r terms + Σ dyᵢ·Wᵢ."""
    return [
        ("q,k,v", [(hidden, hidden), (kv, hidden), (kv, hidden)]),
        ("o", [(hidden, hidden)]),
        ("gate,up", [(inter, hidden), (inter, hidden)]),
        ("down", [(hidden, inter)]),
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps)
CONFIGS = [
    (128, 256, 64, 8, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (128, 128, 64, 8, 4, 4),
    (128, 128, 64, 8, 5, 8),
    (256, 128, 64, 8, 3, 8),
    (128, 256, 64, 16, 3, 8),
    (64, 256, 64, 8, 4, 4),
    (128, 128, 128, 8, 3, 8),
]


@triton.jit
def tile_origin(tile, tiles_m, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row, column) where output tile number `tile` starts, in grouped order: GROUP_M row blocks sweep the
    columns together, so the right operand's tiles stay in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return (first_m + (tile % per_group) % rows) * BLOCK_M, ((tile % per_group) // rows) * BLOCK_N


@triton.jit
def _segment(acc, a_desc, b_desc, off_m, off_n, K: tl.constexpr, BLOCK_K: tl.constexpr):
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        a = a_desc.load([off_m, k * BLOCK_K])
        b = b_desc.load([k * BLOCK_K, off_n])
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _nn_gemm(
    a0, b0, a1, b1, a2, b2, c_desc, M, N,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, SEGMENTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
):  # fmt: skip
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    while tile < tiles_m * tiles_n:  # persistent: one program per SM
        off_m, off_n = tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _segment(acc, a0, b0, off_m, off_n, K0, BLOCK_K)
        if SEGMENTS > 1:
            acc = _segment(acc, a1, b1, off_m, off_n, K1, BLOCK_K)
        if SEGMENTS > 2:
            acc = _segment(acc, a2, b2, off_m, off_n, K2, BLOCK_K)
        acc += c_desc.load([off_m, off_n]).to(tl.float32)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))
        tile += PROGRAMS


def input_grad(dys: list[torch.Tensor], weights: list[torch.Tensor], out: torch.Tensor, config: tuple) -> torch.Tensor:
    """out += Σᵢ dysᵢ·weightsᵢ, in place."""
    block_m, block_n, block_k, group_m, stages, warps = config
    tokens, width = out.shape
    pairs = [
        (TensorDescriptor.from_tensor(dy, [block_m, block_k]), TensorDescriptor.from_tensor(w, [block_k, block_n]))
        for dy, w in zip(dys, weights)
    ]
    pairs += [pairs[0]] * (3 - len(pairs))
    ks = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    programs = min(
        torch.cuda.get_device_properties(out.device).multi_processor_count,
        triton.cdiv(tokens, block_m) * triton.cdiv(width, block_n),
    )
    _nn_gemm[(programs,)](
        *[x for pair in pairs for x in pair], TensorDescriptor.from_tensor(out, [block_m, block_n]), tokens, width,
        K0=ks[0], K1=ks[1], K2=ks[2], SEGMENTS=len(dys), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m, PROGRAMS=programs, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out


def timed(fn) -> float:
    """Milliseconds of fn on the GPU alone (bench/gpu_bench.py's `timed_us`)."""
    return timed_us(fn, torch.device("cuda")) / 1e3


def best_triton(dys, ws, dx) -> tuple[float, tuple | None]:
    """(ms, config) of the fastest configuration of ftw's kernel whose result is right."""
    best, best_config = float("inf"), None
    for config in CONFIGS:
        try:
            got = input_grad(dys, ws, out=dx.clone(), config=config)
            expected = dx.float() + sum(dy.float() @ w.float() for dy, w in zip(dys, ws))
            error = ((got.float() - expected).norm() / expected.norm()).item()
            if error > 1e-2:
                print(f"{config}: relative error {error:.3g}, skipped")
                continue
            ms = timed(lambda: input_grad(dys, ws, out=dx, config=config))  # noqa: B023  (timed at once)
        except Exception as exc:  # a configuration this GPU cannot compile (shared memory)
            print(f"{config}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if ms < best:
            best, best_config = ms, config
    return best, best_config


def group_row(shape: str, name: str, weights: list[tuple[int, int]]) -> dict:
    tokens = SHAPES[shape][0]
    dys = [torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16) for out, _ in weights]
    ws = [torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) / out**0.5 for out, inp in weights]
    wts = [w.t().contiguous() for w in ws]
    dx = torch.randn(tokens, weights[0][1], device="cuda", dtype=torch.bfloat16)  # the rank-r terms
    flops = sum(2 * tokens * out * inp for out, inp in weights)

    def cublas_nn():
        for dy, w in zip(dys, ws):
            dx.addmm_(dy, w)

    def cublas_tn():
        for dy, wt in zip(dys, wts):
            dx.addmm_(dy, wt.t())

    nn, tn = timed(cublas_nn), timed(cublas_tn)  # dx accumulates over the repeats: its values stay moderate
    transpose = timed(lambda: [w.t().contiguous() for w in ws])
    best, config = best_triton(dys, ws, dx)
    return dict(shape=shape, group=name, tokens=tokens, weights=weights, cublas_nn_ms=nn, cublas_tn_ms=tn,
                transpose_ms=transpose, triton_nn_ms=best, triton_config=str(config),
                nn_tflops=flops / nn / 1e9, tn_tflops=flops / tn / 1e9, triton_tflops=flops / best / 1e9)  # fmt: skip


def rows_for(shape: str) -> list[dict]:
    _, hidden, inter, kv = SHAPES[shape]
    return [group_row(shape, name, weights) for name, weights in groups(hidden, inter, kv)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the rows here")
    args, _, _ = setup(__doc__, parser)
    rows = [row for shape in args.shapes for row in rows_for(shape)]
    columns = ["shape", "dx += Σ dyᵢ·Wᵢ", "cuBLAS (addmm per W)", "cuBLAS, Wᵀ stored", "transposing the W's"]
    print("| " + " | ".join([*columns, "ftw Triton", "ftw / cuBLAS", "config"]) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['group']} ({r['tokens']} tokens) | {r['cublas_nn_ms']:.3f} ms "
            f"({r['nn_tflops']:.0f} TF) | {r['cublas_tn_ms']:.3f} ({r['tn_tflops']:.0f}) | {r['transpose_ms']:.3f} | "
            f"{r['triton_nn_ms']:.3f} ({r['triton_tflops']:.0f}) | {r['cublas_nn_ms'] / r['triton_nn_ms']:.3f}× | "
            f"{r['triton_config']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

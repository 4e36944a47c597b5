"""The base GEMMs of the projections that share an input (q, k, v; gate, up), one per weight as ftw runs them
against one GEMM over the weights stacked (out₁ + out₂ + … rows), forward and dx, with LoRA's rank-r terms
as ftw adds them (written first; the base GEMM accumulates onto them through cuBLAS's beta). The question: at
1B the q/k/v dx GEMMs ran at 520 TFLOP/s against gate/up's 765 (bench/gemm_layouts.py): do the narrow k and v
GEMMs (512 outputs at 1B) cost what a stacked weight would save?

    python3 bench/stacked_gemms.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/stacked_gemms.py --shapes tiny                    # the harness on CPU

Arms, per group (every projection of a decoder layer; the stacked ones where several share an input):
  ftw           one GEMM per weight, as kernels/ftw_kernels/base_weight.py runs them: forward s·(x·Aᵢᵀ)·Bᵢᵀ written
                first and x·Wᵢᵀ added by the base GEMM (cuBLAS's beta); dx = the rank-r terms, then Σ dyᵢ·Wᵢ added
  base only     the base GEMMs without LoRA: what the rank-r terms cost is the difference
  rank-r after  the base GEMM first, then s·(x·Aᵢᵀ)·Bᵢᵀ added by a rank-r addmm (ftw before 601fe9b)
  beta 1        ftw's order with s folded into B (forward) or A (dx), so the base GEMM adds with beta = 1
  terms alone   the forward's rank-r GEMMs without the base GEMMs: what writing the terms costs
  bordered      LoRA as a bordered weight: x·Aᵀ written beside x (one tokens × (in + Σr) buffer), then one GEMM
                per projection against [Wᵢ | s·Bᵢ in its rank columns, zeros in the others']; dx likewise, one GEMM
                per projection of [dyᵢ | dybᵢ] (dybᵢ written beside dyᵢ by the product that forms it) against
                [Wᵢ ; Aᵢ] (Aᵢ's rows under Wᵢ's), each adding itself to the last: no term written first
  stacked       the weights as one (Σ out × in) matrix: forward one rank-r GEMM (block-diagonal B) and one
                base GEMM; dx one GEMM over [dy₁ | dy₂ | …], those taken as one buffer (written so by their producer)
  stacked+cat   the same dx with the dyᵢ concatenated first (what autograd gives when the outputs are split views)
Times: bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5); ratios against `ftw`
in the same run (> 1: faster than ftw)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402

RANK, SCALE = 16, 2.0


def groups(hidden: int, inter: int, kv: int) -> list[tuple[str, list[int], int]]:
    """(name, each weight's outputs, their shared input width) of a decoder layer's projections."""
    return [
        ("q,k,v", [hidden, kv, kv], hidden),
        ("o", [hidden], hidden),
        ("gate,up", [inter, inter], hidden),
        ("down", [hidden], inter),
    ]


def group_row(tokens: int, outs: list[int], width: int, device: torch.device, dtype: torch.dtype) -> dict:
    """µs of each arm of one group, forward and dx (kernels/ftw_kernels/base_weight.py's order for `ftw`)."""

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype) / shape[-1] ** 0.5

    stacked_w = rand(sum(outs), width)
    weights = list(stacked_w.split(outs))
    a_rows = rand(RANK * len(outs), width)
    bs = [rand(out, RANK) for out in outs]
    block_b = torch.block_diag(*bs)  # Σ out × Σ r
    x = rand(tokens, width)
    dy_all = rand(tokens, sum(outs))
    dys = [t.contiguous() for t in dy_all.split(outs, dim=1)]
    dyb = rand(tokens, RANK * len(outs))

    def forward_ftw(beta: float = SCALE, scaled: list[torch.Tensor] = bs):
        xa = x @ a_rows.t()
        for i, (w, b) in enumerate(zip(weights, scaled)):
            (xa[:, i * RANK : (i + 1) * RANK] @ b.t()).addmm_(x, w.t(), beta=beta)

    def terms_only():
        xa = x @ a_rows.t()
        for i, b in enumerate(bs):
            xa[:, i * RANK : (i + 1) * RANK] @ b.t()

    def input_grad(dx: torch.Tensor, beta: float) -> None:
        for dy, w in zip(dys, weights):
            dx.addmm_(dy, w, beta=beta)
            beta = 1.0

    def forward_after():
        xa = x @ a_rows.t()
        for i, (w, b) in enumerate(zip(weights, bs)):
            (x @ w.t()).addmm_(xa[:, i * RANK : (i + 1) * RANK], b.t(), alpha=SCALE)

    # LoRA as a bordered weight: [x | x·Aᵀ]·[W | s·B]ᵀ, the rank-r columns of the other projections zero
    bordered_x = torch.cat([x, x @ a_rows.t()], dim=1)
    bordered_w = torch.cat([stacked_w, SCALE * block_b], dim=1).split(outs)

    def forward_bordered():
        bordered_x[:, width:] = x @ a_rows.t()
        for w in bordered_w:
            bordered_x @ w.t()

    # dx over bordered weights: [dyᵢ | dybᵢ]·[Wᵢ ; Aᵢ] (s inside dyb, as ftw's copies of s·B give it)
    wide_dys = [torch.cat([dy, dyb[:, i * RANK : (i + 1) * RANK]], dim=1) for i, dy in enumerate(dys)]
    tall_ws = [torch.cat([w, a_rows[i * RANK : (i + 1) * RANK]]) for i, w in enumerate(weights)]

    def input_grad_bordered():
        dx, beta = torch.empty_like(x), 0.0
        for dy, w in zip(wide_dys, tall_ws):
            dx.addmm_(dy, w, beta=beta)
            beta = 1.0

    arms = {
        "fwd base only": lambda: [x @ w.t() for w in weights],
        "fwd bordered": forward_bordered,
        "fwd ftw": forward_ftw,
        "fwd beta 1": lambda: forward_ftw(1.0, [SCALE * b for b in bs]),
        "fwd terms only": terms_only,
        "fwd rank-r after": forward_after,
        "dx base only": lambda: input_grad(torch.empty_like(x), 0.0),
        "dx ftw": lambda: input_grad(dyb @ a_rows, SCALE),
        "dx beta 1": lambda: input_grad(dyb @ (SCALE * a_rows), 1.0),
        "dx bordered": input_grad_bordered,
    }
    if len(outs) > 1:
        arms |= {
            "fwd stacked": lambda: (x @ a_rows.t() @ block_b.t()).addmm_(x, stacked_w.t(), beta=SCALE),
            "dx stacked": lambda: (dyb @ a_rows).addmm_(dy_all, stacked_w, beta=SCALE),
            "dx stacked+cat": lambda: (dyb @ a_rows).addmm_(torch.cat(dys, dim=1), stacked_w, beta=SCALE),
        }
    flops = 2 * tokens * sum(outs) * width
    return {name: (us, flops / us / 1e6) for name, fn in arms.items() for us in [timed_us(fn, device)]}


def cell(row: dict, name: str, base: float) -> str:
    if name not in row:
        return "- | -"
    us, tflops = row[name]
    return f"{us:.1f} ({tflops:.0f}) | {base / us:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blas", choices=["cublas", "cublaslt"], help="torch.backends.cuda.preferred_blas_library")
    args, device, dtype = setup(__doc__, parser)
    if device.type == "cuda":
        if args.blas:
            torch.backends.cuda.preferred_blas_library(args.blas)
        print(f"BLAS: {torch.backends.cuda.preferred_blas_library()}")
    print(
        "| shape | group | pass | ftw µs (TFLOP/s) | base GEMMs only µs | × ftw | rank-r after µs | × ftw "
        "| bordered µs | × ftw | stacked µs | × ftw | stacked+cat µs | × ftw | beta 1 µs | × ftw "
        "| the terms alone µs |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        tokens, hidden, inter, kv = SHAPES[shape]
        for name, outs, width in groups(hidden, inter, kv):
            row = group_row(tokens, outs, width, device, dtype)
            for direction in ("fwd", "dx"):
                ftw_us, ftw_tflops = row[f"{direction} ftw"]
                cells = [
                    cell(row, f"{direction} {arm}", ftw_us)
                    for arm in ("base only", "rank-r after", "bordered", "stacked", "stacked+cat", "beta 1")
                ]
                terms = row.get(f"{direction} terms only")
                cells.append(f"{terms[0]:.1f}" if terms else "-")
                print(f"| {shape} | {name} | {direction} | {ftw_us:.1f} ({ftw_tflops:.0f}) | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()

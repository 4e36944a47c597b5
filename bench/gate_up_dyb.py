"""Gate's and up's dyb from the SwiGLU backward's own tiles, against two GEMMs reading dg and du back.

The fused MLP's backward (kernels/ftw_kernels/lora.py `LoRAGatedMLP`) runs `swiglu_backward_term`: one kernel adds
down's rank-r term to dh and writes dg and du over g and u. Then gate's and up's dyb (dg·s·B_gate, du·s·B_up:
tokens × r each, which their A grads and dx's rank-r terms read) are two cuBLAS GEMMs, each reading a tokens ×
intermediate grad back from memory (470 MB a step at 8B, ~1.2% of the step by bytes). The candidate here forms them
in the same kernel: after its lanes have written dg and du, a barrier, then a second loop reads the program's own
tiles back (from L2: just written) and adds each lane's rank-sized dot into a partial a column block, summed after.
Doing the dots in the first loop instead, beside the term's, needs 255 registers a thread and spills 2.1 KB
(ptxas, sm_90a; docs/benchmarks.md, 2026-12-06, ninth session): this is the version that keeps the first loop as
it is. Not in ftw: this bench decides whether it is worth building.

    python3 bench/gate_up_dyb.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/gate_up_dyb.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

Both arms start from dh = dy·W_down and return (dg, du, h, dyb); they are checked against each other before timing.
Times: bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5); rank 16, no dropout."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.down_term import backward_inputs  # noqa: E402
from bench.gpu_bench import setup, timed_us  # noqa: E402
from ftw_kernels.lora_dropout import blocking, lane_columns, native_dots, program_rows, rank_block, rank_lhs  # noqa: E402
from ftw_kernels.swiglu import TERM_ROWS, TERM_WARPS, swiglu_backward_term, term_lane  # noqa: E402

RANK = 16


@triton.jit
def _term_then_dyb(DH, G, U, DYB, A, BG, BU, P, n_rows, cols, stride_dyb, stride_a, R, RP: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
    rows = program_rows(ROWS)
    lhs = rank_lhs(DYB, rows, n_rows, stride_dyb, R, RP, NATIVE)
    for lane in tl.static_range(8):  # swiglu_backward_term's loop, without dropout
        term_lane(DH, G, U, A, lhs, rows, lane_columns(lane, BLOCK), n_rows, cols, stride_a, R, False, 1.0, RP, False,
                  NATIVE)  # fmt: skip
    tl.debug_barrier()  # the block's dg and du, stored by its threads, read back by others
    k = tl.arange(0, RP)
    acc_g = tl.zeros((ROWS, RP), dtype=tl.float32)
    acc_u = tl.zeros((ROWS, RP), dtype=tl.float32)
    for lane in tl.static_range(8):
        cols_idx = lane_columns(lane, BLOCK)
        offs = rows[:, None] * cols + cols_idx[None, :]
        inside = (rows[:, None] < n_rows) & (cols_idx[None, :] < cols)
        b_offs = cols_idx[:, None] * R + k[None, :]
        b_in = (cols_idx[:, None] < cols) & (k[None, :] < R)
        dg, du = tl.load(G + offs, mask=inside, other=0.0), tl.load(U + offs, mask=inside, other=0.0)
        bg, bu = tl.load(BG + b_offs, mask=b_in, other=0.0), tl.load(BU + b_offs, mask=b_in, other=0.0)
        if NATIVE:
            acc_g += tl.dot(dg, bg)
            acc_u += tl.dot(du, bu)
        else:  # the interpreter multiplies 16-bit operands as raw bits: fp32, exactly
            acc_g += tl.dot(dg.to(tl.float32), bg.to(tl.float32), input_precision="ieee")
            acc_u += tl.dot(du.to(tl.float32), bu.to(tl.float32), input_precision="ieee")
    p_offs = tl.program_id(1).to(tl.int64) * 2 * R * n_rows + k[None, :] * n_rows + rows[:, None]
    p_in = (rows[:, None] < n_rows) & (k[None, :] < R)
    tl.store(P + p_offs, acc_g, mask=p_in)
    tl.store(P + p_offs + R * n_rows, acc_u, mask=p_in)


def candidate(dh, g, u, dyb, a, bg, bu):
    """One kernel: the term, dg and du over g and u, h over dh, then the dyb partials; their sum."""
    rows, cols = g.shape
    block = blocking(rows, cols)[2]
    partials = torch.empty(triton.cdiv(cols, block), 2 * RANK, rows, dtype=torch.float32, device=g.device)
    _term_then_dyb[(triton.cdiv(rows, TERM_ROWS), triton.cdiv(cols, block))](
        dh, g, u, dyb, a, bg, bu, partials, rows, cols, dyb.stride(0), a.stride(0), RANK,
        RP=rank_block(RANK), ROWS=TERM_ROWS, BLOCK=block, NATIVE=native_dots(g), num_warps=TERM_WARPS,
    )  # fmt: skip
    return g, u, dh, partials.sum(0).to(g.dtype)


def today(dh, g, u, dyb, a, bg, bu):
    """ftw's: the kernel, then gate's and up's dyb as two GEMMs over dg and du (as `_input_grad` forms them)."""
    h = swiglu_backward_term(dh, g, u, dyb, a, None)
    return g, u, h, torch.cat([bg.t() @ g.t(), bu.t() @ u.t()])


def main() -> None:
    args, device, dtype = setup(__doc__)
    print("| shape | today µs | dyb inside µs | × | max |Δ| / max |x|, dg du h | the same, dyb |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        dy, w, dyb, a, g0, u0 = backward_inputs(shape, RANK, device, dtype)
        bg, bu = (torch.randn(g0.shape[1], RANK, device=device, dtype=dtype) / 4 for _ in range(2))
        outs = [arm(dy @ w, g0.clone(), u0.clone(), dyb, a, bg, bu) for arm in (today, candidate)]
        errs = [(x.float() - y.float()).abs().max().item() / x.float().abs().max().item() for x, y in zip(*outs)]
        g, u, dh = g0.clone(), u0.clone(), dy @ w  # timed in place, as the MLP's backward runs (dh: overwritten)
        today_us = timed_us(partial(today, dh, g, u, dyb, a, bg, bu), device)
        inside_us = timed_us(partial(candidate, dh, g, u, dyb, a, bg, bu), device)
        cells = f"{today_us:.1f} | {inside_us:.1f} | {today_us / inside_us:.2f}× | {max(errs[:3]):.1e} | {errs[3]:.1e}"
        print(f"| {shape} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

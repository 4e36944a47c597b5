"""The fused MLP's backward from dh = dy·W_down on, by column blocks (kernels/ftw_kernels/swiglu_columns.py)
against the row-wise pass before it, without dropout:

  row-wise   the SwiGLU backward with down's term inside (swiglu.swiglu_backward_term) writing dg, du over g, u and
             h over dh; down's A grad dyb·h as a GEMM reading h; gate's and up's dyb and B grads, each pair from one
             read of dg or du (kernels/ftw_kernels/rank_grads.py): ftw's backward before 2026-12-06's tenth session
  columns    one pass by column blocks writing dg and du, down's A grad and gate's and up's B grads summed inside
             (h never written); gate's and up's dyb as cuBLAS's GEMMs over dg and du

Both arms' results (dg, du, the three grads, the two dyb) are checked against each other before timing.

    python3 bench/swiglu_columns.py --shapes llama-8b,llama-1b      # on a GPU (< 30 s)
    python3 bench/swiglu_columns.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

`--tiles ROWSxCOLSxWARPS,...` adds the columns arm at other tilings of its kernel (swiglu_columns.ROWS tokens a
step, COLS columns a program, WARPS warps), e.g. --tiles 32x64x4,64x64x8. Times: bench/gpu_bench.py's `timed_us`
(the GPU's time alone, the median of 30 after 5), rank 16 everywhere, LoRA's scale 2."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.down_term import backward_inputs  # noqa: E402
from bench.gpu_bench import at_tilings, rel_diff, setup, timed_us  # noqa: E402
from ftw_kernels import swiglu_columns  # noqa: E402
from ftw_kernels.rank_grads import rank_grads  # noqa: E402
from ftw_kernels.swiglu import swiglu_backward_term  # noqa: E402

RANK, SCALE = 16, 2.0
LAYERS = {"llama-8b": 32, "llama-1b": 16, "tiny": 2}


def fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else (a @ b).float()


def row_wise(dh, g, u, dyb, a, xa, bs, dybs):
    h = swiglu_backward_term(dh, g, u, dyb, a, None)
    grad_a = fp32_product(dyb, h)
    grads_b = [rank_grads(d, b, xa[:, i * RANK : (i + 1) * RANK], SCALE, out, torch.float32)
               for i, (d, b, out) in enumerate(zip((g, u), bs, dybs))]  # fmt: skip
    return g, u, grad_a, *grads_b, *dybs


def columns(dh, g, u, dyb, a, xa, bs, dybs):
    grad_a, *grads_b = swiglu_columns.swiglu_backward_columns(dh, g, u, dyb, a, xa, (RANK, RANK), (SCALE, SCALE))
    for d, b, out in zip((g, u), bs, dybs):
        torch.mm(b.t(), d.t(), out=out)
    return g, u, grad_a, *grads_b, *dybs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default="", help="ROWSxCOLSxWARPS,... of the kernel to time besides its own")
    args, device, dtype = setup(__doc__, parser)
    print("| shape | row-wise µs | columns µs | × | ms a step less | max |Δ| / max, worst of dg du dA dB dyb |")
    print("|---|---:|---:|---:|---:|---:|")
    timed = []
    for shape in args.shapes:
        dy, w, dyb, a, g0, u0 = backward_inputs(shape, RANK, device, dtype)
        dh0 = dy @ w
        tokens, inter = g0.shape
        xa = torch.randn(tokens, 2 * RANK, device=device, dtype=dtype)
        bs = [torch.randn(inter, RANK, device=device, dtype=dtype) / inter**0.5 for _ in range(2)]
        made = []
        for arm in (row_wise, columns):
            dybs = [torch.empty(RANK, tokens, device=device, dtype=dtype) for _ in range(2)]
            made.append((arm, dybs, arm(dh0.clone(), g0.clone(), u0.clone(), dyb, a, xa, bs, dybs)))
        err = max(rel_diff(x, y) for x, y in zip(made[0][2], made[1][2]))
        # timed in place, as the MLP's backward runs (the row-wise arm's h lands over its dh)
        arms = [partial(arm, dh0.clone(), g0.clone(), u0.clone(), dyb, a, xa, bs, dybs) for arm, dybs, _ in made]
        row_us, col_us = (timed_us(arm, device) for arm in arms)
        saved = (row_us - col_us) * LAYERS[shape] / 1e3
        print(
            f"| {shape} | {row_us:.1f} | {col_us:.1f} | {row_us / col_us:.2f}× | {saved:.2f} | {err:.1e} |", flush=True
        )
        timed.append((shape, [arms[1]], row_us, "row-wise"))
    if args.tiles:
        at_tilings(swiglu_columns, ("ROWS", "COLS", "WARPS"), timed, args.tiles, device, "columns")


if __name__ == "__main__":
    main()

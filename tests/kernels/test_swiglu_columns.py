"""The SwiGLU backward by column blocks (kernels/ftw_kernels/swiglu_columns.py): the dg and du of the row-wise
kernel, down's A grad and gate's and up's B grads against float64, and the fused MLP's backward taking it (no GEMM
reads an h) where no dropout is on down's input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftw_kernels import rank_grads
from ftw_kernels.lora import Projection, lora_gated_mlp
from ftw_kernels.swiglu import swiglu_backward_term
from ftw_kernels.swiglu_columns import columns_fit, swiglu_backward_columns
from tests.kernels.conftest import rel_err

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT = torch.float32 if DEVICE == "cpu" else torch.bfloat16  # the interpreter's exact dots; a GPU's tensor cores


@pytest.mark.parametrize(
    "tokens, width, ranks, dtype",
    [(48, 64, (4, 4, 3), FLOAT), (300, 200, (16, 16, 16), FLOAT), (130, 96, (8, 16, 8), torch.bfloat16)],
)
@pytest.mark.parametrize("programs_per_sm", [1, 64])  # every token in one split; several splits summed after
def test_columns_give_the_row_wise_grads(tokens, width, ranks, dtype, programs_per_sm, monkeypatch, rng_seed):
    monkeypatch.setattr(rank_grads, "PROGRAMS_PER_SM", programs_per_sm)
    rank, rank_g, rank_u = ranks

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale

    dh, g, u = rand(tokens, width), rand(tokens, width), rand(tokens, width)
    dyb, a, xa = rand(rank, tokens, scale=0.25), rand(rank, width, scale=0.25), rand(tokens, rank_g + rank_u)
    assert columns_fit(g, a, xa, (rank_g, rank_u))
    g_rows, u_rows = g.clone(), u.clone()
    h = swiglu_backward_term(dh.clone(), g_rows, u_rows, dyb, a, None)  # the row-wise kernel: h over dh
    grad_a, grad_bg, grad_bu = swiglu_backward_columns(dh, g, u, dyb, a, xa, (rank_g, rank_u), (0.5, 2.0))
    assert torch.equal(g, g_rows) and torch.equal(u, u_rows)  # dg and du, the same fp32 arithmetic a tile
    bound = 1e-6 if dtype == torch.float32 else 1e-5  # fp32 sums of the rounded h, dg, du in another order
    assert rel_err(grad_a, dyb.double() @ h.double()) < bound, rng_seed
    assert rel_err(grad_bg, 0.5 * g_rows.double().t() @ xa[:, :rank_g].double()) < bound, rng_seed
    assert rel_err(grad_bu, 2.0 * u_rows.double().t() @ xa[:, rank_g:].double()) < bound, rng_seed


TOKENS, HIDDEN, INTER, RANK = 40, 32, 64, 8


class _ProductsOverH(TorchDispatchMode):
    """The GEMMs that read a tokens × intermediate h for down's A grad (dyb·h)."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "mm":
            self.seen += args[0].shape == (RANK, TOKENS) and args[1].shape == (TOKENS, INTER)
        return func(*args, **(kwargs or {}))


def _projection(out: int, inp: int, dropout: float = 0.0) -> Projection:
    a = torch.randn(RANK, inp, device=DEVICE, dtype=FLOAT, requires_grad=True)
    b = torch.randn(out, RANK, device=DEVICE, dtype=FLOAT, requires_grad=True)
    return Projection(torch.randn(out, inp, device=DEVICE, dtype=FLOAT) / inp**0.5, None, a, b, 2.0, dropout)


@pytest.mark.parametrize("dropout, by_columns", [(0.0, True), (0.1, False)])
def test_the_mlp_backward_walks_columns_without_downs_dropout(dropout, by_columns):
    """Without dropout on down's input no GEMM reads h (down's A grad is summed inside the column-wise pass); with
    it the row-wise kernel draws h's mask and writes h for that GEMM."""
    mlp = [
        _projection(INTER, HIDDEN, dropout),
        _projection(INTER, HIDDEN, dropout),
        _projection(HIDDEN, INTER, dropout),
    ]
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=FLOAT)
    y = lora_gated_mlp(x, *mlp)
    with _ProductsOverH() as seen:
        y.backward(torch.randn_like(y))
    assert seen.seen == (0 if by_columns else 1)


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ftw_kernels.swiglu_columns import COLS, ROWS, WARPS, _swiglu_bwd_columns
ints = dict.fromkeys(("n_rows", "cols", "stride_dyb", "stride_a", "stride_xa", "R", "R_G", "R_U"), "i32")
signature = {**dict.fromkeys(("DH", "G", "U", "DYB", "A", "XA"), "*bf16"),
             **dict.fromkeys(("PART_DA", "PART_DBG", "PART_DBU"), "*fp32"), **ints,
             **dict.fromkeys(("scale_g", "scale_u"), "fp32"),
             **dict.fromkeys(("RP", "RPG", "RPU", "ROWS", "COLS", "STEPS", "NATIVE"), "constexpr")}
for rp in (16, 32):
    constexprs = {"RP": 16, "RPG": rp, "RPU": rp, "ROWS": ROWS, "COLS": COLS, "STEPS": 64, "NATIVE": True}
    source = ASTSource(fn=_swiglu_bwd_columns, signature=signature, constexprs=constexprs)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS}).asm["cubin"]
print("compiled")
"""


def test_the_kernel_compiles_for_hopper():
    """The kernel as the GPU runs it (Triton's compiler and ptxas for sm_90, without the interpreter), at gate's
    and up's ranks 16 and 32; the tests above check its numbers through the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")])
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-2000:]

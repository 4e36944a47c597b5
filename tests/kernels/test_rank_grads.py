"""dyb and B's grad from one read of dy (kernels/ftw_kernels/rank_grads.py): their numbers against float64, the
fused LoRA backward forming both without cuBLAS's two products over each dy, and the kernel's compilation for
Hopper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftw_kernels import rank_grads as rank_grads_module
from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections
from ftw_kernels.rank_grads import MAX_R, fusable, rank_grads
from tests.kernels.conftest import rel_err

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the kernel takes fp32 under the interpreter (exact dots) and 16-bit operands on a GPU (tensor-core dots)
FLOAT = torch.float32 if DEVICE == "cpu" else torch.bfloat16


@pytest.fixture(autouse=True)
def any_width(monkeypatch):
    """The kernel at these tests' narrow outputs (bench/rank_grads.py keeps it from outputs under MIN_COLS)."""
    monkeypatch.setattr(rank_grads_module, "MIN_COLS", 0)


def _inputs(tokens: int, width: int, rank: int, dtype: torch.dtype):
    """dy with a row stride past its width, s·B as a slot of a wider buffer (a bordered weight's), x·Aᵀ as
    columns of the tokens × Σr product: the layouts the fused projections hand the kernel."""
    dy = torch.randn(tokens, width + 8, device=DEVICE, dtype=dtype)[:, :width]
    b = torch.randn(width, rank + 24, device=DEVICE, dtype=dtype)[:, 8 : 8 + rank]
    xa = torch.randn(tokens, 3 * rank, device=DEVICE, dtype=dtype)[:, rank : 2 * rank]
    return dy, b, xa


@pytest.mark.parametrize(
    "tokens, width, rank, dtype",
    [(48, 64, 4, FLOAT), (300, 200, 16, FLOAT), (513, 130, 8, torch.bfloat16), (40, 70, MAX_R, FLOAT)],
)
@pytest.mark.parametrize("programs_per_sm", [1, 64])  # one column split; many, each a step or two of columns
def test_dyb_and_b_grad_match_float64(tokens, width, rank, dtype, programs_per_sm, monkeypatch, rng_seed):
    monkeypatch.setattr(rank_grads_module, "PROGRAMS_PER_SM", programs_per_sm)
    dy, b, xa = _inputs(tokens, width, rank, dtype)
    assert fusable(dy, b, xa)
    dyb = torch.full((2 * rank, tokens), float("nan"), device=DEVICE, dtype=dtype)
    grad_b = rank_grads(dy, b, xa, 0.5, dyb[rank:], torch.float32)
    assert grad_b.dtype == torch.float32 and grad_b.shape == (width, rank)
    assert torch.isnan(dyb[:rank]).all()  # rows outside the slice it was given: untouched
    # fp32: exact sums up to their order; bf16: dyb rounded once to its dtype, B's grad kept in fp32
    tolerance = 1e-6 if dtype == torch.float32 else 4e-3
    assert rel_err(dyb[rank:], (dy.double() @ b.double()).t()) < tolerance, rng_seed
    assert rel_err(grad_b, 0.5 * dy.double().t() @ xa.double()) < (1e-6 if dtype == torch.float32 else 1e-5), rng_seed


def test_empty_token_rows_give_zero_grads():
    dy, b, xa = _inputs(0, 64, 8, FLOAT)
    dyb = torch.empty(8, 0, device=DEVICE, dtype=FLOAT)
    assert torch.equal(rank_grads(dy, b, xa, 2.0, dyb, torch.float32), torch.zeros(64, 8, device=DEVICE))


def test_past_max_rank_or_with_mixed_dtypes_it_declines():
    dy, b, xa = _inputs(32, 64, MAX_R + 8, FLOAT)
    assert not fusable(dy, b, xa)
    dy, b, xa = _inputs(32, 64, 8, FLOAT)
    assert not fusable(dy, b.double(), xa)
    assert not fusable(dy.t(), b, xa)  # a column stride: the kernel reads rows


def test_narrow_outputs_keep_the_two_gemms(monkeypatch):
    monkeypatch.undo()  # MIN_COLS as it is
    dy, b, xa = _inputs(32, rank_grads_module.MIN_COLS - 64, 8, FLOAT)
    assert not fusable(dy, b, xa)
    dy, b, xa = _inputs(32, rank_grads_module.MIN_COLS, 8, FLOAT)
    assert fusable(dy, b, xa)


TOKENS, HIDDEN, INTER = 40, 32, 64


class _ProductsOverDy(TorchDispatchMode):
    """The matmuls that read a projection's output gradient for a rank-sized product: dyb's (s·B)ᵀ·dyᵀ and B's
    grad dyᵀ·(x·Aᵀ)."""

    def __init__(self, widths: set[int], rank: int):
        super().__init__()
        self.widths, self.rank, self.dyb, self.grad_b = widths, rank, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "mm":
            left, right = args[0].shape, args[1].shape
            self.dyb += left[0] == self.rank and left[1] in self.widths and right == (left[1], TOKENS)
            self.grad_b += left[1] == TOKENS and left[0] in self.widths and right == (TOKENS, self.rank)
        return func(*args, **(kwargs or {}))


def _projection(out: int, inp: int, rank: int) -> Projection:
    a = torch.randn(rank, inp, device=DEVICE, dtype=FLOAT, requires_grad=True)
    b = torch.randn(out, rank, device=DEVICE, dtype=FLOAT, requires_grad=True)
    return Projection(torch.randn(out, inp, device=DEVICE, dtype=FLOAT) / inp**0.5, None, a, b, 2.0)


@pytest.mark.parametrize("rank, fused", [(8, True), (MAX_R + 8, False)])
def test_the_fused_backward_reads_each_dy_once_for_both(rank, fused):
    """Up to MAX_R no cuBLAS product over any dy for dyb or B's grad (q, k, v; gate, up, down): the kernel forms
    both. Past it, the two GEMMs a projection, as before."""
    qkv = [_projection(out, HIDDEN, rank) for out in (HIDDEN, 16, 16)]
    mlp = [_projection(INTER, HIDDEN, rank), _projection(INTER, HIDDEN, rank), _projection(HIDDEN, INTER, rank)]
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=FLOAT, requires_grad=True)
    outs = lora_projections(x, qkv)
    y = lora_gated_mlp(x, *mlp)
    with _ProductsOverDy({HIDDEN, 16, INTER}, rank) as seen:
        torch.autograd.backward([*outs, y], [torch.randn_like(o) for o in (*outs, y)])
    assert (seen.dyb, seen.grad_b) == ((0, 0) if fused else (6, 6))
    for p in qkv + mlp:
        assert p.lora_b.grad is not None and torch.isfinite(p.lora_b.grad).all()


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ftw_kernels.rank_grads import COLS, ROWS, _rank_grads
ints = dict.fromkeys(("n_rows", "n_cols", "stride_dy", "stride_b", "stride_xa", "R"), "i32")
signature = {**dict.fromkeys(("DY", "B", "XA"), "*bf16"), **dict.fromkeys(("PART_DYB", "PART_DB"), "*fp32"), **ints,
             "scale": "fp32", **dict.fromkeys(("RP", "ROWS", "COLS", "STEPS", "NATIVE"), "constexpr")}
for rp in (16, 32):
    constexprs = {"RP": rp, "ROWS": ROWS, "COLS": COLS, "STEPS": 32, "NATIVE": True}
    source = ASTSource(fn=_rank_grads, signature=signature, constexprs=constexprs)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
print("compiled")
"""


def test_the_kernel_compiles_for_hopper():
    """The kernel as the GPU runs it (Triton's compiler and ptxas for sm_90, without the interpreter), at ranks 16
    and 32; the tests above check its numbers through the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")])
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-2000:]

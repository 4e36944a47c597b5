"""The fused LoRA projections make no pass over an activation only to add the rank-r term: over a
floating-point base that term is written first and the base GEMM adds itself to it (cuBLAS's beta), in the
forward (each y) and in the backward (dx). Each such pass would read and write tokens × width. LoRA's scale
lives in B's compute-dtype copy: no matmul scales, and only B's grads take a scaling pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections
from tests.kernels.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS, HIDDEN, INTER, RANK = 48, 32, 64, 4


class _ActivationWrites(TorchDispatchMode):
    """Each matmul or add that writes into an existing tokens-row activation: (op, its contraction length)."""

    def __init__(self):
        super().__init__()
        self.accumulating: list[tuple[str, int]] = []
        self.rank_writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in ("addmm", "addmm_", "add", "add_") and target is not None and target.shape[0] == TOKENS:
            self.accumulating.append((name, args[1].shape[-1] if name.startswith("addmm") else 0))
        if name == "mm" and args[0].shape[0] == TOKENS and args[0].shape[1] <= 3 * RANK:
            self.rank_writes += 1
        return func(*args, **(kwargs or {}))


def _projection(out: int, inp: int, scale: float) -> Projection:
    a = torch.randn(RANK, inp, device=DEVICE, requires_grad=True)
    b = torch.randn(out, RANK, device=DEVICE, requires_grad=True)
    return Projection(torch.randn(out, inp, device=DEVICE) / inp**0.5, None, a, b, scale)


@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (2.0, 0.5, 1.0)])
def test_qkv_add_the_rank_terms_inside_the_base_gemms(scales):
    made = [_projection(out, HIDDEN, s) for out, s in zip((HIDDEN, 16, 16), scales)]
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
    with _ActivationWrites() as seen:
        outs = lora_projections(x, made)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    # q, k and v's outputs in the forward, dx in the backward: each one addmm whose contraction is the base's
    assert sorted(seen.accumulating) == sorted(
        [("addmm_", HIDDEN)] * 3 + [("addmm_", HIDDEN), ("addmm_", 16), ("addmm_", 16)]
    )
    assert seen.rank_writes == 3 + 1  # each output's rank-r term, then dx's over the stacked A's


def test_gated_mlp_adds_the_rank_terms_inside_the_base_gemms():
    made = [_projection(INTER, HIDDEN, 2.0), _projection(INTER, HIDDEN, 2.0), _projection(HIDDEN, INTER, 2.0)]
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
    with _ActivationWrites() as seen:
        lora_gated_mlp(x, *made).backward(torch.randn(TOKENS, HIDDEN, device=DEVICE))
    # forward: gate, up (over hidden) and down (over inter); backward: dh (over hidden) and dx (gate's dx, then up's)
    assert sorted(seen.accumulating) == sorted(
        [
            ("addmm_", HIDDEN),
            ("addmm_", HIDDEN),
            ("addmm_", INTER),
            ("addmm_", HIDDEN),
            ("addmm_", INTER),
            ("addmm_", INTER),
        ]
    )


class _Scaling(TorchDispatchMode):
    """The matmuls run with a beta or alpha other than 1, the multiplies, and the concatenations."""

    def __init__(self):
        super().__init__()
        self.scaled_matmuls: list[str] = []
        self.muls: list[tuple[int, ...]] = []
        self.cats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if name.startswith("addmm") and (kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1):
            self.scaled_matmuls.append(name)
        if name in ("mul", "mul_"):
            self.muls.append(tuple(args[0].shape))
        self.cats += name == "cat"
        return func(*args, **kwargs)


def test_scales_ride_the_adapter_copies_not_the_matmuls(monkeypatch):
    """Unequal scales (q 2, k 0.5, v 1; gate, up, down 0.25): no matmul is scaled, no scaled copy of the stacked
    A's is made, and no multiply is left: B's grads take their scale inside the kernel that forms them
    (kernels/ftw_kernels/rank_grads.py)."""
    monkeypatch.setattr("ftw_kernels.rank_grads.MIN_COLS", 0)  # the kernel at these narrow outputs too
    qkv = [_projection(out, HIDDEN, s) for out, s in zip((HIDDEN, 16, 16), (2.0, 0.5, 1.0))]
    mlp = [_projection(INTER, HIDDEN, 0.25), _projection(INTER, HIDDEN, 0.25), _projection(HIDDEN, INTER, 0.25)]
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
    lora_projections(x, qkv)  # the adapters' copies made (and scaled) outside the counted passes
    lora_gated_mlp(x, *mlp)
    with _Scaling() as seen:
        outs = lora_projections(x, qkv)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        lora_gated_mlp(x, *mlp).backward(torch.randn(TOKENS, HIDDEN, device=DEVICE))
    assert seen.scaled_matmuls == []
    assert seen.cats == 0
    # under the interpreter every B grad is formed with its scale inside a kernel; on a GPU these fp32 operands
    # stay with cuBLAS, whose fp32 product then takes one multiply a projection
    assert sorted(seen.muls) == ([] if DEVICE == "cpu" else sorted(tuple(p.lora_b.shape) for p in qkv + mlp))


class _Casts(TorchDispatchMode):
    """The dtype conversions run (`_to_copy`), each one more kernel over its tensor."""

    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func.overloadpacket.__name__ == "_to_copy"
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(DEVICE != "cuda", reason="the GEMM writes fp32 from bf16 operands on CUDA only")
def test_fp32_adapter_grads_come_straight_from_their_gemms():
    made = [_projection(out, HIDDEN, 2.0) for out in (HIDDEN, 16, 16)]
    made = [Projection(p.weight.bfloat16(), None, p.lora_a, p.lora_b, p.scale) for p in made]  # PEFT's layout
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    outs = lora_projections(x, made)
    with _Casts() as seen:
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    assert seen.casts == 0
    for p in made:
        assert p.lora_a.grad.dtype == p.lora_b.grad.dtype == torch.float32


WIDE = 128  # an intermediate whose lanes are wide enough for the term's dot (kernels/ftw_kernels/swiglu.py)


class _TermKernels(TorchDispatchMode):
    """The addmm's that write into a tokens × WIDE tensor: in the backward, the dx GEMM adding itself to down's
    rank-r term."""

    def __init__(self):
        super().__init__()
        self.wide_addmms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.wide_addmms += name in ("addmm", "addmm_") and tuple(args[0].shape) == (TOKENS, WIDE)
        return func(*args, **(kwargs or {}))


def _mlp_grads(made: list[Projection], x: torch.Tensor, dy: torch.Tensor, dropout: float, seed: int):
    for p in made:
        p.lora_a.grad = p.lora_b.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the dropout masks' seeds
    y = lora_gated_mlp(x, *[Projection(p.weight, None, p.lora_a, p.lora_b, p.scale, dropout) for p in made])
    with _TermKernels() as seen:  # the backward's (gate's and up's forward GEMMs add onto their terms too)
        y.backward(dy)
    return [x.grad, *(g for p in made for g in (p.lora_a.grad, p.lora_b.grad))], seen.wide_addmms


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_downs_rank_term_rides_the_swiglu_backward(dropout, rng_seed, monkeypatch):
    """dh's rank-r term is added inside the SwiGLU backward's pass, not written for the dx GEMM to read (beta 1):
    no addmm writes a tokens × intermediate tensor, and every grad is the one the GEMM's addition gives."""
    made = [_projection(WIDE, HIDDEN, 2.0), _projection(WIDE, HIDDEN, 2.0), _projection(HIDDEN, WIDE, 0.5)]
    x, dy = torch.randn(TOKENS, HIDDEN, device=DEVICE), torch.randn(TOKENS, HIDDEN, device=DEVICE)
    inside, wide_addmms = _mlp_grads(made, x, dy, dropout, rng_seed)
    assert wide_addmms == 0
    monkeypatch.setattr("ftw_kernels.swiglu.TERM_MAX_R", 0)  # every rank too large: the GEMM adds the term
    added, wide_addmms = _mlp_grads(made, x, dy, dropout, rng_seed)
    assert wide_addmms == 1
    for got, want in zip(inside, added):  # fp32 summed in another order (on a GPU, elements near 0 differ by 6e-4)
        assert rel_err(got, want) < 1e-5

"""One read of dy for a LoRA projection's dy·(s·B) and B's grad (kernels/ftw_kernels/rank_grads.py): both against
the plain products, over the strided operands the fused backward hands it (a stacked xa's columns, dyb's rows, a
bordered weight's s·B slot), at ranks that are not a power of two, with the output columns split across programs,
with B frozen; the same result on every run; and a model trained through it against the unpatched one."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig

from ftw_kernels import apply_kernels, rank_grads
from tests.kernels.conftest import rel_err
from tests.kernels.test_apply_kernels import assert_matches_reference, packed_batch, tiny, training_config

ON_INTERPRETER = pytest.mark.skipif(not rank_grads.INTERPRETED, reason="CPU tensors through Triton's interpreter")


def operands(tokens: int, out: int, rank: int, dtype=torch.float32):
    """(dy, s·B as a slot of a wider buffer, xa as the middle columns of a stacked one, dyb as rows of a stacked
    one): the layouts lora.py passes."""
    torch.manual_seed(tokens + out + rank)
    dy = torch.randn(tokens, out, dtype=dtype)
    b = torch.randn(out, 40 + rank, dtype=dtype)[:, 40:]
    xa = torch.randn(tokens, 3 * rank, dtype=dtype)[:, rank : 2 * rank]
    dyb = torch.full((3 * rank, tokens), float("nan"), dtype=dtype)[rank : 2 * rank]
    return dy, b, xa, dyb


@ON_INTERPRETER
@pytest.mark.parametrize(
    "tokens,out,rank,min_programs",
    [
        (48, 64, 16, 1),  # whole tiles, one program's columns
        (37, 50, 8, 1),  # ragged tokens and columns; rank padded to the dot's 16
        (40, 96, 24, 1),  # rank 24, padded to 32
        (32, 160, 16, 8),  # the columns split across programs: partial dyb rows summed
        (19, 72, 4, 6),  # both
    ],
)
def test_matches_the_plain_products(tokens, out, rank, min_programs, monkeypatch):
    monkeypatch.setattr(rank_grads, "MIN_PROGRAMS", min_programs)
    dy, b, xa, dyb = operands(tokens, out, rank)
    scale = 0.75
    grad = rank_grads.rank_grads(dy, b, xa, scale, dyb)
    assert grad.shape == (out, rank) and grad.dtype == torch.float32 and grad.is_contiguous()
    assert rel_err(grad, scale * dy.t() @ xa) < 1e-5
    assert rel_err(dyb, (dy @ b).t()) < 1e-5


@ON_INTERPRETER
def test_columns_split_when_the_tokens_alone_leave_programs_idle(monkeypatch):
    """The split partials are a second path through the kernel: the grid has them, and they sum to one split's."""
    dy, b, xa, dyb = operands(32, 256, 16)
    one = rank_grads.rank_grads(dy, b, xa, 1.0, dyb).clone(), dyb.clone()
    calls = []
    launch = rank_grads._rank_grads.__getitem__
    monkeypatch.setattr(rank_grads, "MIN_PROGRAMS", 16)
    monkeypatch.setattr(
        type(rank_grads._rank_grads), "__getitem__", lambda self, grid: calls.append(grid) or launch(grid)
    )
    split = rank_grads.rank_grads(dy, b, xa, 1.0, dyb)
    assert calls and calls[0][1] > 1
    assert rel_err(split, one[0]) < 1e-6 and rel_err(dyb, one[1]) < 1e-6


@ON_INTERPRETER
def test_frozen_b_writes_dyb_only():
    dy, b, _, dyb = operands(24, 48, 16)
    assert rank_grads.rank_grads(dy, b, None, 2.0, dyb) is None
    assert rel_err(dyb, (dy @ b).t()) < 1e-5


@ON_INTERPRETER
def test_every_run_sums_in_the_same_order(monkeypatch):
    monkeypatch.setattr(rank_grads, "MIN_PROGRAMS", 6)
    dy, b, xa, dyb = operands(64, 96, 16)
    first = rank_grads.rank_grads(dy, b, xa, 1.0, dyb), dyb.clone()
    again = rank_grads.rank_grads(dy, b, xa, 1.0, dyb), dyb.clone()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@ON_INTERPRETER
def test_serves_half_precision_on_cuda_and_the_cpu_only_when_asked(monkeypatch):
    assert not rank_grads.serves(torch.zeros(2, 2))  # CPU, not asked
    monkeypatch.setattr(rank_grads, "ON_CPU", True)
    assert rank_grads.serves(torch.zeros(2, 2))
    monkeypatch.setattr(rank_grads, "ENABLED", False)
    assert not rank_grads.serves(torch.zeros(2, 2))


@ON_INTERPRETER
@pytest.mark.parametrize("b_trains", [True, False])
def test_model_trained_through_it_matches_the_reference(b_trains, monkeypatch):
    """Every LoRA projection's backward through the kernel: the loss and every grad as the unpatched model's."""
    calls = []
    kernel = rank_grads.rank_grads
    monkeypatch.setattr(rank_grads, "ON_CPU", True)
    monkeypatch.setattr(rank_grads, "rank_grads", lambda *a: calls.append(a[2] is not None) or kernel(*a))
    ref = tiny(LlamaConfig)
    if not b_trains:
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.requires_grad_(False)
    model = copy.deepcopy(ref)
    apply_kernels(model, training_config(use_kernels=True))
    grads = assert_matches_reference(ref, model, packed_batch())
    assert len(calls) == 7 * 2 and all(c == b_trains for c in calls)  # 7 projections × 2 layers
    assert any("lora_B" in n for n in grads) == b_trains


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel")
@pytest.mark.parametrize("tokens,out", [(8192, 14336), (8192, 1024), (16384, 2048), (16384, 512)])
def test_cuda_bf16_at_the_llama_shapes(tokens, out):
    """Against fp32 products of the same bf16 operands: the kernel accumulates in fp32 as cuBLAS does."""
    dy, b, xa, dyb = (t.cuda() for t in operands(tokens, out, 16, torch.bfloat16))
    assert rank_grads.serves(dy)
    grad = rank_grads.rank_grads(dy, b, xa, 2.0, dyb)
    assert rel_err(grad, 2.0 * dy.float().t() @ xa.float()) < 1e-4
    assert rel_err(dyb.float(), (dy.float() @ b.float()).t()) < 1e-2  # rounded to bf16 once

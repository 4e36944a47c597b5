"""LoRA's dropout inside the fused projections (kernels/ftw_kernels/lora_dropout.py): the fused functions against
the same masks applied by hand (the mask's own law: test_dropout_mask.py), and a patched PEFT model
(lora_dropout > 0) against the same model whose dropout modules draw the kernels' masks, with and without
checkpointing."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from ftw_kernels import apply_kernels
from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections
from ftw_kernels.lora_dropout import Dropout, draw, dropped, rank_terms_dropped
from tests.conftest import REPO
from tests.kernels.conftest import rel_err
from tests.kernels.test_apply_kernels import (
    BORDERED,
    DEVICE,
    FULL,
    assert_matches_reference,
    loss_and_grads,
    packed_batch,
    tiny,
    training_config,
)

TOKENS, HIDDEN, INTER, RANK, P = 40, 48, 80, 4, 0.3


def mask(rows: int, cols: int, dropout: Dropout) -> torch.Tensor:
    """keep/(1 − p) of every element, as the kernel draws it."""
    return dropped(torch.ones(rows, cols, device=DEVICE), dropout)


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ftw_kernels.lora_dropout import _dropout_rows, _rank_terms_dropped
from ftw_kernels.swiglu import _swiglu_bwd_dropped, _swiglu_fwd_dropped

scalars = {**dict.fromkeys(("n_rows", "cols", "stride_x", "stride_y", "seed", "threshold"), "i32"), "scale": "fp32"}
for dtype in ("*bf16", "*fp32"):
    signature = {"X": dtype, "Y": dtype, **scalars, "ROWS": "constexpr", "BLOCK": "constexpr"}
    for rows, block in ((1, 1024), (16, 64)):
        source = ASTSource(fn=_dropout_rows, signature=signature, constexprs={"ROWS": rows, "BLOCK": block})
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
    # the SwiGLU kernels that write down's dropped input in their own pass
    drop = {"n_rows": "i32", "cols": "i32", "seed": "i32", "threshold": "i32", "scale": "fp32"}
    blocks = {"ROWS": "constexpr", "BLOCK": "constexpr"}
    kernels = (
        (_swiglu_fwd_dropped, {"G": dtype, "U": dtype, "H": dtype, "HD": dtype, **drop, **blocks}),
        (_swiglu_bwd_dropped, {**dict.fromkeys(("DH", "G", "U", "H", "DG", "DU"), dtype), **drop, **blocks}),
    )
    for fn, signature in kernels:
        for rows, block in ((1, 1024), (16, 64)):
            source = ASTSource(fn=fn, signature=signature, constexprs={"ROWS": rows, "BLOCK": block})
            assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
# dx's rank-r terms written through the mask (16-bit operands: tensor-core dots)
ints = dict.fromkeys(("n_rows", "cols", "stride_dyb", "stride_a", "R", "seed"), "i32")
signature = {"DYB": "*bf16", "A": "*bf16", "Y": "*bf16", **ints, "threshold": "i32", "scale": "fp32",
             **dict.fromkeys(("RP", "ROWS", "BLOCK", "NATIVE"), "constexpr")}
for rp in (16, 64):
    constexprs = {"RP": rp, "ROWS": 16, "BLOCK": 1024, "NATIVE": True}
    source = ASTSource(fn=_rank_terms_dropped, signature=signature, constexprs=constexprs)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
# the SwiGLU backward that adds down's rank-r term (through the mask, or without dropout)
from ftw_kernels.swiglu import _swiglu_bwd_term
ints = dict.fromkeys(("n_rows", "cols", "stride_dyb", "stride_a", "R", "seed", "threshold"), "i32")
signature = {**dict.fromkeys(("DH", "G", "U", "DYB", "A"), "*bf16"), **ints, "scale": "fp32",
             **dict.fromkeys(("RP", "ROWS", "BLOCK", "DROP", "NATIVE"), "constexpr")}
for drop in (False, True):
    for rows, warps in ((16, 8), (32, 16)):  # its tiling, and one bench/down_term.py --tiles times
        constexprs = {"RP": 16, "ROWS": rows, "BLOCK": 1024, "DROP": drop, "NATIVE": True}
        source = ASTSource(fn=_swiglu_bwd_term, signature=signature, constexprs=constexprs)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]
print("compiled")
"""


def test_the_kernel_compiles_for_hopper():
    """The kernels as the GPU runs them: Triton's compiler and ptxas for sm_90 (no GPU needed; in a process
    without the interpreter), at the blockings `dropped` picks for a wide and a narrow row, and the SwiGLU kernels
    that draw its mask. The tests above check their numbers through the interpreter, this their compilation."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")])
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-2000:]


def _projection(out: int, inp: int, scale: float, p: float = P) -> Projection:
    a = torch.randn(RANK, inp, device=DEVICE, requires_grad=True)
    b = torch.randn(out, RANK, device=DEVICE, requires_grad=True)
    bias = torch.randn(out, device=DEVICE)
    return Projection(torch.randn(out, inp, device=DEVICE) / inp**0.5, bias, a, b, scale, p)


def _reference(x: torch.Tensor, p: Projection, keep: torch.Tensor | None) -> torch.Tensor:
    lora_in = x if keep is None else x * keep
    base = x @ p.weight.t() + (0 if p.bias is None else p.bias)
    return base + p.scale * (lora_in @ p.lora_a.t()) @ p.lora_b.t()


def _grads(outs, inputs, douts):
    return torch.autograd.grad(outs, inputs, douts)


@pytest.mark.parametrize("hidden", [HIDDEN, 1024], ids=["dropout-pass", "rank-terms-kernel"])
def test_projections_of_one_input_share_one_mask(hidden, rng_seed):
    made = [_projection(out, hidden, s) for out, s in zip((hidden, 16, 16), (2.0, 0.5, 1.0))]
    x = torch.randn(TOKENS, hidden, device=DEVICE, requires_grad=True)
    douts = [torch.randn(TOKENS, p.weight.shape[0], device=DEVICE) for p in made]
    torch.manual_seed(rng_seed)
    outs = lora_projections(x, made)
    torch.manual_seed(rng_seed)
    keep = mask(TOKENS, hidden, draw(P))  # the one draw lora_projections made
    refs = [_reference(x, p, keep) for p in made]
    inputs = [x, *(t for p in made for t in (p.lora_a, p.lora_b))]
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < 1e-5
    for got, want in zip(_grads(outs, inputs, douts), _grads(refs, inputs, douts)):
        assert rel_err(got, want) < 1e-5
    undropped = [_reference(x, p, None) for p in made]
    assert all(rel_err(out, ref) > 1e-2 for out, ref in zip(outs, undropped))  # the mask did something


@pytest.mark.parametrize("inter", [INTER, 1024], ids=["narrow", "mask-block-wide"])
@pytest.mark.parametrize("checkpoint", [None, "forward"])
def test_gated_mlp_masks_gate_and_up_input_and_downs(checkpoint, inter, rng_seed):
    """Gate and up share one mask over x, down has its own over h = silu(g)·u, which its backward recomputes and
    masks again (with checkpointing it also forms h·A_downᵀ from it), the SwiGLU kernels drawing it; at a width of a
    whole mask block down's dx terms are written through the mask by the rank-r kernel."""
    gate, up, down = _projection(inter, HIDDEN, 2.0), _projection(inter, HIDDEN, 2.0), _projection(HIDDEN, inter, 2.0)
    gate, up, down = (Projection(p.weight, None, p.lora_a, p.lora_b, p.scale, p.dropout) for p in (gate, up, down))
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
    dy = torch.randn(TOKENS, HIDDEN, device=DEVICE)
    torch.manual_seed(rng_seed)
    y = lora_gated_mlp(x, gate, up, down, checkpoint=checkpoint)
    torch.manual_seed(rng_seed)
    keep_x, keep_h = mask(TOKENS, HIDDEN, draw(P)), mask(TOKENS, inter, draw(P))
    g, u = _reference(x, gate, keep_x), _reference(x, up, keep_x)
    ref = _reference(torch.nn.functional.silu(g) * u, down, keep_h)
    assert rel_err(y, ref) < 1e-5
    inputs = [x, *(t for p in (gate, up, down) for t in (p.lora_a, p.lora_b))]
    for got, want in zip(_grads([y], inputs, [dy]), _grads([ref], inputs, [dy])):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("cols", [1024, 3072, 80, 1500, 18944])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_writes_h_dropped_as_the_dropout_pass_would(cols, dtype, monkeypatch):
    """Down's dropped input comes from the SwiGLU kernels' own pass, forward and backward, bit for bit the mask and
    values `dropped` gives h, at any width (narrow rows share a program, as in the dropout pass): no second pass
    runs."""
    from ftw_kernels import lora_dropout, swiglu

    g, u, dh = (torch.randn(6, cols, device=DEVICE, dtype=dtype) for _ in range(3))
    d = Dropout(0.3, 4321)
    h = swiglu.swiglu_forward_raw(g, u)
    want = dropped(h, d)
    monkeypatch.setattr(lora_dropout, "dropped", lambda *a, **k: pytest.fail("a second pass over h"))
    got_h, got = swiglu.swiglu_forward_dropped(g, u, d)
    assert torch.equal(got_h, h) and torch.equal(got, want)
    grads = [torch.empty_like(g) for _ in range(4)]
    recomputed = swiglu.swiglu_backward(dh.clone(), g, u, *grads[:2], want_h=True, dropout=d)
    assert torch.equal(recomputed, want)
    swiglu.swiglu_backward(dh.clone(), g, u, *grads[2:], want_h=True)
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])  # dg, du as without dropout


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_term_kernels_tiling_changes_no_number(p, monkeypatch):
    """bench/down_term.py --tiles times the SwiGLU backward with down's term at other tilings (token rows a program,
    warps): each gives the default's dg, du and h bit for bit, mask included (the tiles split rows and columns;
    each element's draw and its term's sum are its own)."""
    from ftw_kernels import swiglu

    rows, cols, rank = 70, 2048, 16
    dh, g, u = (torch.randn(rows, cols, device=DEVICE) for _ in range(3))
    dyb, a = torch.randn(rank, rows, device=DEVICE), torch.randn(rank, cols, device=DEVICE)
    drop = Dropout(p, 99) if p else None

    def run():
        g2, u2 = g.clone(), u.clone()
        return g2, u2, swiglu.swiglu_backward_term(dh.clone(), g2, u2, dyb, a, drop)

    want = run()
    monkeypatch.setattr(swiglu, "TERM_ROWS", 32)
    monkeypatch.setattr(swiglu, "TERM_WARPS", 16)
    for got, expected in zip(run(), want):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "sum_r,tokens,width,max_r",
    [(16, 40, 1024, 16), (12, 33, 2500, 16), (48, 17, 2048, 16), (48, 17, 2048, 64), (32, 17, 80, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dx_rank_terms_are_written_through_the_mask_in_one_kernel(sum_r, tokens, width, max_r, dtype, monkeypatch):
    """dx's rank-r terms under dropout are the product through the forward's mask: the same elements dropped, the
    rest scaled, whether one kernel writes them (≥ one mask block wide, Σr ≤ 16: no dropout pass then) or the
    product takes the dropout pass."""
    from ftw_kernels import lora_dropout

    dyb = torch.randn(sum_r, tokens, device=DEVICE, dtype=dtype)
    a_rows = torch.randn(sum_r, width, device=DEVICE, dtype=dtype)
    d = Dropout(0.3, 99)
    want = dropped((dyb.t().float() @ a_rows.float()).to(dtype), d)
    if width >= 1024 and sum_r <= max_r:
        monkeypatch.setattr(lora_dropout, "dropped", lambda *a, **k: pytest.fail("a dropout pass over the terms"))
    got = rank_terms_dropped(dyb, a_rows, d, max_r=max_r)
    assert torch.equal(got == 0, want == 0) and (want == 0).any()
    # fp32: exact; bf16: each rounding one unit of the last place at most (the interpreter rounds toward zero)
    assert rel_err(got.float(), want.float()) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_projections_with_unequal_dropout_are_not_fused_as_one_input():
    """One mask an input needs one probability: a group whose LoRA projections differ is left to PEFT's layers
    (the patches ask `shared_dropout`), and the fused function refuses it."""
    from ftw_kernels.lora import shared_dropout

    made = [_projection(HIDDEN, HIDDEN, 2.0, p) for p in (0.1, 0.1, 0.2)]
    plain = Projection(made[0].weight, None, None, None, 0.0)
    assert shared_dropout(made[:2]) == 0.1 and shared_dropout([plain, made[2]]) == 0.2 and shared_dropout([plain]) == 0
    assert shared_dropout(made) is None
    with pytest.raises(ValueError, match="lora_dropout differs"):
        lora_projections(torch.randn(TOKENS, HIDDEN, device=DEVICE), made)


def test_dropout_keeps_no_more_for_the_backward(rng_seed):
    """The dropped copy replaces the input in what the backward keeps: dropout costs no activation memory."""

    def saved_bytes(p: float) -> int:
        made = [_projection(out, HIDDEN, 2.0, p) for out in (HIDDEN, 16, 16)]
        x = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
        kept: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] == TOKENS:  # activations, not the weights
                kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lora_projections(x, made)
        return sum(kept)

    assert saved_bytes(P) == saved_bytes(0.0) > 0


class _KernelMaskDropout(torch.nn.Module):
    """PEFT's lora_dropout drawing the fused kernels' masks: the first projection of an input draws, the others
    of that input (`slot`, shared) reuse its mask, as the fused functions do."""

    def __init__(self, p: float, slot: list, draws: bool):
        super().__init__()
        self.p, self.slot, self.draws = p, slot, draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.draws:
            self.slot[:] = [draw(self.p)]
        rows = x.reshape(-1, x.shape[-1])
        return (rows * mask(rows.shape[0], rows.shape[1], self.slot[0])).view_as(x)


def _kernel_mask_reference(model, p: float):
    """The model with each layer's LoRA dropouts drawing as the kernels do (q draws for k and v, gate for up)."""
    for layer in model.get_base_model().model.layers:
        for group in (["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]):
            slot: list = []
            for i, name in enumerate(group):
                parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                getattr(parent, name).lora_dropout["default"] = _KernelMaskDropout(p, slot, draws=i == 0)
    return model


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])  # Qwen2: q, k, v with biases
def test_patched_model_with_dropout_matches_the_kernels_masks(config_cls):
    """lora_dropout > 0 takes the fused LoRA path (not bordered: the rank-r terms read the dropped input), and
    its loss and every grad are those of PEFT's layers under the same masks."""
    model = tiny(config_cls, dropout=0.1)
    ref = _kernel_mask_reference(copy.deepcopy(model), 0.1)
    applied = apply_kernels(model, training_config(use_kernels=True, lora_dropout=0.1))
    assert applied == [k for k in FULL if k not in BORDERED]
    _assert_same_run(ref, model)
    batch = packed_batch()
    dropped, _ = loss_and_grads(model, batch)
    undropped, _ = loss_and_grads(tiny(config_cls), batch)
    assert abs(dropped.item() - undropped.item()) > 1e-4  # the masks changed the loss


def test_qlora_with_dropout_matches_the_kernels_masks():
    """Over a bitsandbytes 4-bit base too: the base GEMMs read each weight dequantised, the rank-r terms the dropped
    input."""
    pytest.importorskip("bitsandbytes")
    from tests.kernels.test_qlora import FUSED, qlora_config, tiny_qlora

    model = tiny_qlora(dropout=0.1)
    ref = _kernel_mask_reference(copy.deepcopy(model), 0.1)
    assert set(FUSED) <= set(apply_kernels(model, qlora_config(lora_dropout=0.1)))
    _assert_same_run(ref, model)


def _assert_same_run(ref, model) -> None:
    """The same loss and grads from one packed batch, each model drawing from the same torch seed."""
    torch.manual_seed(3)
    batch = packed_batch()
    torch.manual_seed(11)
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    torch.manual_seed(11)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5 and ref_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_recompute_draws_the_first_forwards_masks(reentrant):
    """The recompute (which skips the down projection) must draw every mask its first forward drew, in order: the
    grads are then those of the same masks without checkpointing."""
    plain = tiny(LlamaConfig, dropout=0.1)
    checkpointed = copy.deepcopy(plain)
    apply_kernels(plain, training_config(use_kernels=True, lora_dropout=0.1))
    base = checkpointed.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    base.enable_input_require_grads()
    apply_kernels(checkpointed, training_config(use_kernels=True, lora_dropout=0.1, gradient_checkpointing=True))
    batch = packed_batch()
    torch.manual_seed(11)
    loss, grads = loss_and_grads(plain, batch)
    torch.manual_seed(11)
    ck_loss, ck_grads = loss_and_grads(checkpointed, batch)
    assert rel_err(ck_loss, loss) < 1e-6
    for name in grads:
        assert rel_err(ck_grads[name], grads[name]) < 1e-5, name


def test_eval_mode_drops_nothing():
    """PEFT's dropout is the identity in eval mode; so is the fused one."""
    ref = tiny(LlamaConfig, dropout=0.1).eval()
    model = copy.deepcopy(ref)
    apply_kernels(model, training_config(use_kernels=True, lora_dropout=0.1))
    assert_matches_reference(ref, model.eval(), packed_batch())

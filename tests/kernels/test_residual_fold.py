"""A patched decoder layer's residual stream costs no add of its own: the post-attention norm's kernel writes the
attention's add beside its output, the fused LoRA MLP adds the stream inside its down projection's GEMMs, and each
norm adds the stream's grad to its dx inside its own backward, instead of autograd summing the two grads in a
kernel of its own. Loss and every adapter grad match the
unpatched model for all four dense families (tests/kernels/test_apply_kernels.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from ftw_kernels import apply_kernels
from ftw_kernels.rmsnorm import rms_norm_and_residual
from tests.kernels.conftest import rel_err
from tests.kernels.test_apply_kernels import (
    DEVICE,
    HIDDEN_SIZE,
    assert_matches_reference,
    loss_and_grads,
    packed_batch,
    tiny,
    training_config,
)


class _StreamAdds(TorchDispatchMode):
    """The adds whose output is a whole hidden-state tensor (batch × seq × hidden), forward and backward."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape, self.adds = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("add", "add_") and isinstance(out, torch.Tensor):
            self.adds += out.shape == self.shape
        return out


def _unfolded(model) -> None:
    """The same patched model with each decoder layer's own forward back (its adds where transformers has them)."""
    for layer in model.get_base_model().model.layers:
        layer.forward = layer._ftw_original_forward


def _stream_adds(model, batch) -> int:
    shape = torch.Size((*batch["input_ids"].shape, HIDDEN_SIZE))
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)  # layer 0's stream grad is wanted too
    with _StreamAdds(shape) as seen:
        model(**batch).loss.backward()
    return seen.adds


@pytest.mark.parametrize("fused_mlp", [True, False], ids=["fused-mlp", "swiglu-mlp"])
def test_decoder_layers_add_the_stream_in_no_pass_of_its_own(fused_mlp):
    folded = tiny(LlamaConfig)
    applied = apply_kernels(folded, training_config(use_kernels=True, lora_mlp_kernel=fused_mlp))
    assert "residual_fold" in applied and ("lora_mlp" in applied) == fused_mlp
    unfolded = copy.deepcopy(folded)
    _unfolded(unfolded)
    batch = packed_batch()
    layers = len(folded.get_base_model().model.layers)
    adds, folded_adds = _stream_adds(unfolded, batch), _stream_adds(folded, batch)
    if fused_mlp:
        assert adds == 4 * layers  # two adds forward, two grad sums backward, each layer
        assert folded_adds == 0  # the MLP's add rides the fused down projection's GEMMs
    else:  # PEFT's MLP adds its LoRA terms; the stream's add after it is the one left
        assert adds - folded_adds == 3 * layers


def test_embedding_grad_matches_through_the_folded_stream():
    """A trained embedding (lora_modules_to_save) takes its grad through every layer's stream and both norms'
    added grads: the same as unpatched."""
    ref = tiny(LlamaConfig, modules_to_save=["embed_tokens"])
    model = copy.deepcopy(ref)
    assert "residual_fold" in apply_kernels(model, training_config(use_kernels=True))
    assert any("embed_tokens" in name for name in assert_matches_reference(ref, model, packed_batch()))


def test_an_fp32_stream_under_bf16_autocast_joins_after_the_mlp():
    """fp32 weights trained under bf16 autocast: the MLP computes in bf16 and the fp32 stream cannot be its GEMMs'
    addend; it is added after, in fp32, as transformers adds it: loss and grads as unpatched, within bf16."""
    ref = tiny(LlamaConfig)
    model = copy.deepcopy(ref)
    assert "residual_fold" in apply_kernels(model, training_config(use_kernels=True))
    batch = packed_batch()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(ref, batch)
        loss, grads = loss_and_grads(model, batch)
    assert loss.dtype == ref_loss.dtype == torch.float32 and rel_err(loss, ref_loss) < 1e-2
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 5e-2, name


def _reference_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm: fp32 statistics, the normalised rows cast back before the weight."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)


@pytest.mark.parametrize("used", ["both", "norm", "stream"])
@pytest.mark.parametrize("delta", [None, torch.float32, torch.bfloat16])
def test_norm_passes_the_stream_and_adds_its_grad(used, delta, rng_seed):
    """h = x (+ delta: an fp32 stream plus a bf16 block output too, promoted as `x + delta` is): the norm of h and
    h itself, and the grads of x and delta, as autograd gives them for the unfused ops."""
    torch.manual_seed(rng_seed)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(64, device=DEVICE))
    norm.variance_epsilon = 1e-6
    x = torch.randn(2, 24, 64, device=DEVICE, requires_grad=True)
    d = None if delta is None else torch.randn(2, 24, 64, device=DEVICE, dtype=delta, requires_grad=True)
    dy, dres = torch.randn_like(x), torch.randn_like(x)

    def loss(y, stream):
        through_norm = [(y * dy).sum()] if used != "stream" else []
        return sum(through_norm + ([(stream * dres).sum()] if used != "norm" else []))

    inputs = (x, norm.weight) if d is None else (x, d, norm.weight)
    y, stream = rms_norm_and_residual(norm, x, d)
    got = torch.autograd.grad(loss(y, stream), inputs, allow_unused=True)
    copies = [t.detach().clone().requires_grad_(True) for t in inputs]
    h = copies[0] if d is None else copies[0] + copies[1]
    ref_y = _reference_norm(h, copies[-1])
    want = torch.autograd.grad(loss(ref_y, h), copies, allow_unused=True)
    assert torch.equal(stream, h.detach()) and rel_err(y, ref_y) < 1e-6
    for name, g, w in zip(("x", "weight") if d is None else ("x", "delta", "weight"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and rel_err(g, w) < 1e-5, name

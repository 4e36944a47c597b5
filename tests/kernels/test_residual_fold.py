"""A patched decoder layer makes no pass over the residual stream only to add to it: o_proj and down_proj start
their outputs from the stream (inside the GEMM that first writes them), and each norm adds the stream's grad to
its dx inside its own backward, instead of autograd summing x's two grads in a kernel of its own. Loss and every
adapter grad match the unpatched model for all four dense families (tests/kernels/test_apply_kernels.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from ftw_kernels import apply_kernels
from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections
from ftw_kernels.rmsnorm import rms_norm_and_residual
from tests.kernels.conftest import rel_err
from tests.kernels.test_apply_kernels import DEVICE, HIDDEN_SIZE, loss_and_grads, packed_batch, tiny, training_config


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


def test_decoder_layers_make_no_pass_only_to_add_the_residual():
    folded = tiny(LlamaConfig)
    assert "residual_fold" in apply_kernels(folded, training_config(use_kernels=True))
    unfolded = copy.deepcopy(folded)
    _unfolded(unfolded)
    batch = packed_batch()
    layers = len(folded.get_base_model().model.layers)
    assert _stream_adds(unfolded, batch) == 4 * layers  # two adds forward, two grad sums backward, each layer
    assert _stream_adds(folded, batch) == 0


def test_embedding_grad_matches_through_the_folded_stream():
    """A trained embedding (lora_modules_to_save) takes its grad through every layer's stream and both norms'
    added grads: the same as unpatched."""
    ref = tiny(LlamaConfig, modules_to_save=["embed_tokens"])
    model = copy.deepcopy(ref)
    assert "residual_fold" in apply_kernels(model, training_config(use_kernels=True))
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    embed = [n for n in grads if "embed_tokens" in n]
    assert embed and rel_err(loss, ref_loss) < 1e-5
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("used", ["both", "norm", "stream"])
def test_norm_adds_the_stream_grad_to_dx(used, rng_seed):
    torch.manual_seed(rng_seed)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(64, device=DEVICE))
    norm.variance_epsilon = 1e-6
    x = torch.randn(2, 24, 64, device=DEVICE, requires_grad=True)
    dy, dres = torch.randn_like(x), torch.randn_like(x)

    def loss(y, stream):
        through_norm = [(y * dy).sum()] if used != "stream" else []
        return sum(through_norm + ([(stream * dres).sum()] if used != "norm" else []))

    y, stream = rms_norm_and_residual(norm, x)
    gx, gw = torch.autograd.grad(loss(y, stream), (x, norm.weight), allow_unused=True)
    xr = x.detach().clone().requires_grad_(True)
    wr = norm.weight.detach().clone().requires_grad_(True)
    ref_y = wr * xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref_gx, ref_gw = torch.autograd.grad(loss(ref_y, xr), (xr, wr), allow_unused=True)
    assert rel_err(gx, ref_gx) < 1e-5
    if used == "stream":
        assert gw is None and torch.equal(gx, dres)
    else:
        assert rel_err(gw, ref_gw) < 1e-5


def _projection(out: int, inp: int) -> Projection:
    a = torch.randn(4, inp, device=DEVICE, requires_grad=True)
    b = torch.randn(out, 4, device=DEVICE, requires_grad=True)
    return Projection(torch.randn(out, inp, device=DEVICE) / inp**0.5, None, a, b, 2.0)


@pytest.mark.parametrize("block", ["o", "mlp"])
@pytest.mark.parametrize("stream_dtype", [torch.float32, torch.bfloat16])
def test_projection_output_starts_from_the_stream(block, stream_dtype, rng_seed):
    """The stream's grad is the output's; a stream of another dtype than the compute one (an fp32 stream under
    bf16 autocast) is added after instead, promoted as `residual + block(x)` is."""
    torch.manual_seed(rng_seed)
    made = [_projection(32, 32)] if block == "o" else [_projection(48, 32), _projection(48, 32), _projection(32, 48)]

    def run(x, stream):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if block == "o":
                return lora_projections(x, made, stream)[0] if stream is not None else lora_projections(x, made)[0]
            return lora_gated_mlp(x, *made, residual=stream)

    x = torch.randn(2, 12, 32, device=DEVICE, requires_grad=True)
    stream = torch.randn(2, 12, 32, device=DEVICE, dtype=stream_dtype, requires_grad=True)
    out = run(x, stream)
    ref = stream + run(x, None)
    assert out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-2
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, stream, made[-1].lora_b), dout)
    ref_grads = torch.autograd.grad(ref, (x, stream, made[-1].lora_b), dout)
    assert torch.equal(grads[1], ref_grads[1].to(grads[1].dtype))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-2

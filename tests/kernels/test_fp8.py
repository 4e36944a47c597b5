"""FP8 base weights (`fp8_base_weights`, kernels/ftw_kernels/fp8.py) on CPU: the quantisation (scales, round
trip bounds, the Triton kernels under the interpreter against torch), the fused projection's gradients
against float64, and a tiny PEFT model over a float8 base: it trains, its unfused paths run, autograd keeps
no dense weight, and its saved adapter is the ordinary PEFT adapter that loads on the dense base. The
`torch._scaled_mm` path itself runs in bf16 on a GPU (tests/kernels/test_fp8_gpu.py); these fp32 tests take
`matmul`'s dequantising reference (on a GPU too, where the Triton kernels then run natively).
Fixed seeds: the tolerances are fp8's (e4m3 keeps 3 mantissa bits: one rounding is ≤ 2⁻⁴ relative). Under the
interpreter the row kernel rounds to e4m3's grid itself (kernels/ftw_kernels/fp8_quant.py says why)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig

from ftw_kernels import apply_kernels
from ftw_kernels.fp8 import Fp8Weight, is_fp8, matmul, quantise_weight
from ftw_kernels.fp8_quant import FP8, FP8_MAX, quantise_rows, quantise_rows_reference, transposed
from ftw_kernels.lora import Projection, lora_projections
from tests.kernels.conftest import rel_err
from tests.kernels.test_apply_kernels import DEVICE, loss_and_grads, loss_curve, packed_batch, tiny, training_config

ULP = 2.0**-3  # e4m3's spacing relative to the leading power of two


def fp8_config(**kw):
    return training_config(use_kernels=True, fp8_base_weights=True, **kw)


def channels(n: int, k: int) -> torch.Tensor:
    """N×K with output channels spanning five decades (what per-channel scales are for)."""
    return torch.randn(n, k, device=DEVICE) * torch.logspace(-3, 2, n, device=DEVICE)[:, None]


def test_weight_round_trip_scale_shapes_and_memory():
    torch.manual_seed(0)
    w = channels(48, 32)
    q = quantise_weight(w)
    assert isinstance(q, Fp8Weight) and q.dtype == FP8 and q.shape == w.shape and not q.requires_grad
    assert q.scale.shape == (1, 48) and q.scale.dtype == torch.float32
    assert torch.equal(
        q.data.float().abs().amax(dim=1), torch.full((48,), FP8_MAX, device=DEVICE)
    )  # each row uses the range
    err = (q.dequantised(torch.float32) - w).abs()
    assert (err <= w.abs() * ULP / 2 + q.scale.t() * 2.0**-9).all()  # half a step (subnormals: 2⁻⁹ of the scale)
    assert rel_err(q.dequantised(torch.float32), w) < 0.04
    stored = q.numel() * q.element_size() + q.scale.numel() * q.scale.element_size()
    assert stored <= w.numel() * torch.finfo(torch.bfloat16).bits // 8  # never more than the bf16 weight
    assert torch.equal(copy.deepcopy(q).scale, q.scale)


def test_row_quantisation_kernel_matches_torch():
    torch.manual_seed(1)
    x = torch.randn(37, 200, device=DEVICE) * torch.logspace(-4, 3, 37, device=DEVICE)[:, None]
    x[5] = 0.0  # an all-zero row: zeros and a finite scale
    wide = torch.cat([x, torch.ones(37, 8, device=DEVICE)], dim=1)[:, :200]  # rows not contiguous with each other
    col = torch.rand(200, device=DEVICE) + 0.5
    for inp, col_scale in ((x, None), (wide, col)):
        q, s = quantise_rows(inp, col_scale)
        ref_q, ref_s = quantise_rows_reference(inp, col_scale)
        assert q.dtype == FP8 and q.shape == inp.shape and s.shape == (37, 1) and s.dtype == torch.float32
        assert torch.allclose(s, ref_s, rtol=1e-6, atol=0)
        target = inp * (col if col_scale is not None else 1.0)
        assert ((q.float() * s - target).abs() <= target.abs() * ULP + s * 2.0**-8).all()  # within one step
        assert (q.float() - ref_q.float()).abs().le(ref_q.float().abs() * ULP + 2.0**-8).all()
        assert not q[5].float().any() and torch.isfinite(s[5]).all()


def test_transpose_kernel_moves_the_bytes():
    torch.manual_seed(2)
    w = quantise_weight(channels(80, 48)).data
    assert torch.equal(transposed(w).view(torch.uint8), w.t().contiguous().view(torch.uint8))


def test_scaled_mm_takes_the_layout_matmul_assumes():
    """The arguments `matmul` hands `torch._scaled_mm` (a row-major, b a transposed row-major, (M,1) and
    (1,N) fp32 scales) mean what its reference computes, where this CPU build has the op."""
    torch.manual_seed(3)
    x, w = torch.randn(32, 64, device=DEVICE), quantise_weight(channels(48, 64))
    xq, sx = quantise_rows_reference(x)
    try:
        got = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=w.scale, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no _scaled_mm for these operands here: {e}")
    ref = matmul(xq, sx, w.t(), w.scale, torch.float32, fast=False)
    assert rel_err(got, ref) < 1e-2  # bf16 output


def test_projection_gradients_against_float64():
    """One fused projection (LoRA + bias) over a float8 base: y and dx carry fp8's error (x, dy and W rounded
    once each), the LoRA gradients none (their matmuls stay in the compute dtype)."""
    torch.manual_seed(4)
    w, bias = channels(64, 96) / 30, torch.randn(64, device=DEVICE)
    a, b = torch.randn(8, 96, device=DEVICE) / 10, torch.randn(64, 8, device=DEVICE) / 10
    x = torch.randn(50, 96, device=DEVICE)
    dy = torch.randn(50, 64, device=DEVICE)
    xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
    (y,) = lora_projections(xs, [Projection(quantise_weight(w), bias, as_, bs, 2.0)])
    y.backward(dy)
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, a, b))
    ref = x64 @ w.double().t() + bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    ref.backward(dy.double())
    # two roundings per product (x or dy, and W), each of RMS ≈ 2⁻⁴/√3 relative: ≈ 0.05 at most
    assert rel_err(y, ref) < 0.05 and rel_err(xs.grad, x64.grad) < 0.05
    assert rel_err(as_.grad, a64.grad) < 1e-5 and rel_err(bs.grad, b64.grad) < 1e-5


def test_projections_of_one_input_quantise_it_once(monkeypatch):
    """q, k and v (or gate and up) read one input: it is quantised once forward; each dy once backward."""
    import ftw_kernels.fp8 as fp8

    calls: list[tuple[int, ...]] = []

    def counted(x, col_scale=None):
        calls.append(tuple(x.shape))
        return quantise_rows(x, col_scale)

    monkeypatch.setattr(fp8, "quantise_rows", counted)
    torch.manual_seed(10)
    x = torch.randn(20, 32, device=DEVICE, requires_grad=True)
    qkv = [
        Projection(
            quantise_weight(channels(n, 32)),
            None,
            torch.randn(4, 32, device=DEVICE),
            torch.randn(n, 4, device=DEVICE),
            2.0,
        )
        for n in (32, 16, 16)
    ]
    outs = lora_projections(x, qkv)
    assert calls == [(20, 32)]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    assert calls == [(20, 32), (20, 32), (20, 16), (20, 16)] and x.grad is not None


def fp8_model():
    ref = tiny(LlamaConfig)
    model = copy.deepcopy(ref)
    applied = apply_kernels(model, fp8_config())
    assert applied[-1] == "fp8_base", applied
    return ref, model


def base_linears(model) -> list[torch.nn.Linear]:
    layers = model.get_base_model().model.layers
    return [m for layer in layers for m in layer.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]


def test_every_frozen_projection_is_fp8_and_the_loss_follows_the_dense_model():
    torch.manual_seed(5)
    ref, model = fp8_model()
    weights = [m.weight for m in base_linears(model)]
    assert len(weights) == 2 * 7 and all(is_fp8(w) for w in weights)  # 7 projections × 2 layers
    assert not any(is_fp8(p) for p in model.parameters() if p.requires_grad)
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 2e-3
    assert grads.keys() == ref_grads.keys()
    flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, ref_grads))
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.995
    assert rel_err(flat, ref_flat) < 0.1


def test_no_dense_weight_is_kept_for_backward():
    torch.manual_seed(6)
    _, model = fp8_model()
    shapes = {tuple(m.weight.shape) for m in base_linears(model)} | {
        tuple(m.weight.shape[::-1]) for m in base_linears(model)
    }
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(**packed_batch()).loss
    loss.backward()
    assert saved and not [t.shape for t in saved if tuple(t.shape) in shapes]


def test_activation_offloading_keeps_the_fp8_weights_usable():
    """Saved-tensor hooks hand a tensor subclass back detached, without its scales: the fused functions
    keep the float8 weights on their context instead."""
    from worker.train.offload import ActivationOffloader

    torch.manual_seed(7)
    _, model = fp8_model()
    batch = packed_batch()
    plain_loss, plain_grads = loss_and_grads(model, batch)
    offloader = ActivationOffloader(torch.device(DEVICE), min_bytes=1024, keep_last=1)
    model.zero_grad(set_to_none=True)
    with offloader.saving() as stats:
        loss = model(**batch).loss
    loss.backward()
    assert stats.offloaded_tensors > 0
    assert rel_err(loss.detach(), plain_loss) < 1e-6
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert rel_err(p.grad, plain_grads[name]) < 1e-5, name


def test_unfused_paths_run_over_the_fp8_base():
    """With a KV cache the attention hands over to PEFT's layers, which call the patched float8 Linear for
    their base term: the same logits as the fused path, and generation runs."""
    torch.manual_seed(8)
    _, model = fp8_model()
    model.eval()
    ids = packed_batch()["input_ids"]
    with torch.no_grad():
        fused = model(input_ids=ids, use_cache=False).logits
        cached = model(input_ids=ids, use_cache=True).logits
        out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert rel_err(cached, fused) < 1e-5
    assert out.shape == (1, 7)


def test_trained_adapter_is_an_ordinary_peft_adapter_for_the_dense_base(tmp_path):
    torch.manual_seed(9)
    ref, model = fp8_model()
    dense_base = copy.deepcopy(ref).unload()  # tiny()'s base weights, no LoRA layers: what the Hub base would hold
    assert not any("lora_" in name for name, _ in dense_base.named_parameters())
    batch = packed_batch()
    fp8_losses, dense_losses = (loss_curve(m, fused=False, steps=8, batch=batch) for m in (model, ref))
    assert fp8_losses[-1] < fp8_losses[0] - 0.1, fp8_losses
    assert abs(fp8_losses[-1] - dense_losses[-1]) < 0.02, (fp8_losses, dense_losses)
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all("lora_" in k and v.dtype == torch.float32 for k, v in saved.items())
    loaded = PeftModel.from_pretrained(dense_base, str(tmp_path)).eval()
    assert not any(is_fp8(p) for p in loaded.parameters())
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum("lora_" in name for name, _ in loaded.named_parameters()) == len(trained) == 2 * 7 * 2
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, trained[name]), name
    model.eval()
    with torch.no_grad():
        dense_logits = loaded(input_ids=batch["input_ids"]).logits
        fp8_logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert rel_err(fp8_logits, dense_logits) < 0.06  # two fp8 layers' rounding, as in the projection test


def test_refused_where_the_family_patches_do_not_apply():
    model = tiny(LlamaConfig)
    with pytest.raises(RuntimeError, match="fp8_base_weights"):
        apply_kernels(model, training_config(use_kernels=False, fp8_base_weights=True))
    assert not any(is_fp8(p) for p in model.parameters())

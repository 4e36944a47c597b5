"""Each kernel, forward and backward, against a float64 reference on fresh random inputs.

Inputs are rounded to the kernel's dtype first, so the reference sees exactly what the kernel
sees; bounds: fp32 kernels ≲ 1e-5, bf16 ones ≲ 1e-2 (bf16 has 8 mantissa bits).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.bfloat16]


def leaf(t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel input in dtype, float64 copy of the same values), both requiring grad."""
    a = t.to(DEVICE, dtype).requires_grad_()
    return a, a.detach().double().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_trains", [False, True])
def test_rmsnorm(dtype, weight_trains, rng_seed):
    from ftw_kernels.rmsnorm import rms_norm

    x, x64 = leaf(torch.randn(3, 5, 48) * 3, dtype)
    w, w64 = leaf(torch.rand(48) + 0.5, dtype)
    w.requires_grad_(weight_trains)
    w64.requires_grad_(weight_trains)
    y = rms_norm(x, w, 1e-6)
    ref = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    b = BOUND[dtype]
    assert rel_err(y, ref) < b, rng_seed
    assert rel_err(x.grad, x64.grad) < b, rng_seed
    assert (w.grad is not None) == weight_trains
    if weight_trains:
        assert rel_err(w.grad, w64.grad) < b, rng_seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype, rng_seed):
    from ftw_kernels.swiglu import swiglu

    g, g64 = leaf(torch.randn(4, 37) * 2, dtype)
    u, u64 = leaf(torch.randn(4, 37), dtype)
    h = swiglu(g, u)
    ref = torch.nn.functional.silu(g64) * u64
    dh = torch.randn_like(ref)
    h.backward(dh.to(dtype))
    ref.backward(dh)
    b = BOUND[dtype]
    assert rel_err(h, ref) < b and rel_err(g.grad, g64.grad) < b and rel_err(u.grad, u64.grad) < b, rng_seed


def test_swiglu_backward_writes_the_recomputed_h_over_dh(rng_seed):
    """The fused MLP's backward keeps no extra tokens × intermediate buffer: h takes dh's memory, each element's
    dh read before its h is written (dg and du are right), and h is silu(g)·u."""
    from ftw_kernels.swiglu import swiglu_backward

    g, u, dh = (torch.randn(5, 3000, device=DEVICE) for _ in range(3))
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    (torch.nn.functional.silu(g64) * u64).backward(dh.double())
    dh_memory = dh.data_ptr()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    h = swiglu_backward(dh, g, u, dg, du, want_h=True)
    assert h.data_ptr() == dh_memory
    assert rel_err(h, torch.nn.functional.silu(g.double()) * u.double()) < 1e-5, rng_seed
    assert rel_err(dg, g64.grad) < 1e-5 and rel_err(du, u64.grad) < 1e-5, rng_seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_packed_positions(dtype, rng_seed):
    """Position ids restarting inside a row (two packed samples) rotate each sample from 0."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from ftw_kernels.rope import apply_rope

    bsz, seq, heads, dim = 2, 6, 3, 16
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)
    freqs = pos[..., None].double() * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    x, x64 = leaf(torch.randn(bsz, seq, heads, dim), dtype)
    y = apply_rope(x, cos.to(DEVICE, dtype), sin.to(DEVICE, dtype))
    ref, _ = apply_rotary_pos_emb(x64.transpose(1, 2), x64.transpose(1, 2), cos.to(DEVICE), sin.to(DEVICE))
    ref = ref.transpose(1, 2)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    assert rel_err(y, ref) < BOUND[dtype] and rel_err(x.grad, x64.grad) < BOUND[dtype], rng_seed
    # the second sample of row 0 is rotated exactly like the start of row 1
    torch.testing.assert_close(
        y[0, 3:], apply_rope(x[0:1, 3:], cos[1:2, :3].to(DEVICE, dtype), sin[1:2, :3].to(DEVICE, dtype))[0]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("per_token", [False, True], ids=["mean", "per-token"])
def test_fused_linear_cross_entropy(dtype, weight_trains, per_token, rng_seed, monkeypatch):
    """The mean loss (SFT), or each row's loss (`fused_linear_token_losses`, the DPO family's
    log-probs) under a different upstream gradient per row, against F.cross_entropy on the logits."""
    from ftw_kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_LOGITS_BYTES", 4 * 211 * 4)  # several chunks even here
    hidden, h64 = leaf(torch.randn(13, 24), dtype)
    weight, w64 = leaf(torch.randn(211, 24) * 0.3, dtype)
    weight.requires_grad_(weight_trains)
    w64.requires_grad_(weight_trains)
    targets = torch.randint(0, 211, (13,), device=DEVICE)
    ignored = [0, 5, 6]
    targets[ignored] = -100
    if per_token:
        loss = cross_entropy.fused_linear_token_losses(hidden, weight, targets)
        ref = torch.nn.functional.cross_entropy(h64 @ w64.t(), targets, reduction="none")
        upstream = torch.randn(13, dtype=torch.float64, device=DEVICE) * 3
        assert loss.dtype == torch.float32 and loss.shape == (13,) and loss[ignored].abs().sum() == 0
    else:
        loss = cross_entropy.fused_linear_cross_entropy(hidden, weight, targets)
        ref = torch.nn.functional.cross_entropy(h64 @ w64.t(), targets)
        upstream = torch.tensor(2.0, dtype=torch.float64, device=DEVICE)
    loss.backward(upstream.to(loss.dtype))
    ref.backward(upstream)
    b = BOUND[dtype]
    assert rel_err(loss, ref) < b and rel_err(hidden.grad, h64.grad) < b, rng_seed
    assert (weight.grad is not None) == weight_trains, "a frozen output weight must get no gradient"
    if weight_trains:
        assert rel_err(weight.grad, w64.grad) < b, rng_seed
    assert hidden.grad[ignored].abs().sum() == 0  # ignored rows: no gradient


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("per_token", [False, True], ids=["mean", "per-token"])
def test_fused_linear_cross_entropy_keeps_one_chunk_of_logits_alive(weight_trains, per_token, monkeypatch):
    """Each chunk's logits (1 GiB at a 128k vocabulary) are freed before the next chunk's are made, in the
    forward and in the per-token backward: two alive at once were the peak of an 8B QLoRA step."""
    import weakref

    from ftw_kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_LOGITS_BYTES", 4 * 211 * 4)  # 4 rows a chunk: 4 chunks
    made, alive_at_each_call = [], []
    chunk = cross_entropy._chunk_dlogits

    def recording(*args):
        alive_at_each_call.append(sum(ref() is not None for ref in made))
        logits = chunk(*args)
        made.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(cross_entropy, "_chunk_dlogits", recording)
    hidden = torch.randn(13, 24, device=DEVICE, requires_grad=True)
    weight = (torch.randn(211, 24, device=DEVICE) * 0.3).requires_grad_(weight_trains)
    targets = torch.randint(0, 211, (13,), device=DEVICE)
    if per_token:
        cross_entropy.fused_linear_token_losses(hidden, weight, targets).sum().backward()
    else:
        cross_entropy.fused_linear_cross_entropy(hidden, weight, targets).backward()
    assert len(alive_at_each_call) == 4 * (2 if per_token and weight_trains else 1)
    assert alive_at_each_call == [0] * len(alive_at_each_call)


def test_fused_linear_cross_entropy_divisor(rng_seed):
    """num_items_in_batch (gradient accumulation) divides the summed loss instead of the count."""
    from ftw_kernels.cross_entropy import fused_linear_cross_entropy

    hidden = torch.randn(9, 16, device=DEVICE)
    weight = torch.randn(50, 16, device=DEVICE)
    targets = torch.randint(0, 50, (9,), device=DEVICE)
    loss = fused_linear_cross_entropy(hidden, weight, targets, divisor=torch.tensor(20.0, device=DEVICE))
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), targets, reduction="sum") / 20
    assert rel_err(loss, ref) < 1e-5, rng_seed


def _lora(x, w, b, a, bb, s):
    y = x @ w.t() + s * (x @ a.t()) @ bb.t()
    return y + b if b is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (0.5, 2.0, 1.0), (0.0, 1.0, 2.0)])
def test_lora_projections_qkv(dtype, scales, rng_seed):
    """Three projections of one input (q, k, v with bias, as Qwen2), grads of x, A and B; the scales equal
    (one GEMM over the stacked A's), unequal (`alpha_pattern`), and the first zero."""
    from ftw_kernels.lora import Projection, lora_projections

    x, x64 = leaf(torch.randn(2, 5, 32), dtype)
    made, refs = [], []
    for out, scale in zip((32, 16, 16), scales):
        w, w64 = leaf(torch.randn(out, 32) / 6, dtype)
        w.requires_grad_(False)
        w64.requires_grad_(False)
        b, b64 = leaf(torch.randn(out), dtype)
        b.requires_grad_(False)
        b64.requires_grad_(False)
        a, a64 = leaf(torch.randn(4, 32) / 6, torch.float32)  # PEFT keeps adapters in fp32
        bb, bb64 = leaf(torch.randn(out, 4) / 2, torch.float32)
        made.append(Projection(w, b, a, bb, scale))
        refs.append((w64, b64, a64, bb64))
    outs = lora_projections(x, made)
    ref_outs = [_lora(x64, *r, s) for r, s in zip(refs, scales)]
    grads = [torch.randn_like(r) for r in ref_outs]
    torch.autograd.backward(outs, [g.to(dtype) for g in grads])
    torch.autograd.backward(ref_outs, grads)
    b = BOUND[dtype]
    for o, r in zip(outs, ref_outs):
        assert rel_err(o, r) < b, rng_seed
    assert rel_err(x.grad, x64.grad) < b, rng_seed
    for p, r in zip(made, refs):
        assert p.lora_a.grad.dtype == torch.float32
        assert rel_err(p.lora_a.grad, r[2].grad) < b and rel_err(p.lora_b.grad, r[3].grad) < b, rng_seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_gated_mlp(dtype, rng_seed):
    from ftw_kernels.lora import Projection, lora_gated_mlp

    d, inter, r = 24, 40, 4
    x, x64 = leaf(torch.randn(3, 4, d), dtype)
    made, refs = [], []
    for out, inp in ((inter, d), (inter, d), (d, inter)):
        w, w64 = leaf(torch.randn(out, inp) / inp**0.5, dtype)
        w.requires_grad_(False)
        w64.requires_grad_(False)
        a, a64 = leaf(torch.randn(r, inp) / inp**0.5, torch.float32)
        bb, bb64 = leaf(torch.randn(out, r) / 2, torch.float32)
        made.append(Projection(w, None, a, bb, 0.5))
        refs.append((w64, None, a64, bb64))
    y = lora_gated_mlp(x, *made)
    hg = _lora(x64, *refs[0], 0.5)
    hu = _lora(x64, *refs[1], 0.5)
    ref = _lora(torch.nn.functional.silu(hg) * hu, *refs[2], 0.5)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    b = BOUND[dtype]
    assert rel_err(y, ref) < b and rel_err(x.grad, x64.grad) < b, rng_seed
    for p, rf in zip(made, refs):
        assert rel_err(p.lora_a.grad, rf[2].grad) < b and rel_err(p.lora_b.grad, rf[3].grad) < b, rng_seed


def test_fp32_weights_under_autocast(rng_seed):
    """Full fine-tuning with fp16/bf16 autocast keeps fp32 weights: the fused ops compute in the
    autocast dtype, as the unfused ones would, and hand back fp32 gradients."""
    from ftw_kernels.cross_entropy import fused_linear_cross_entropy
    from ftw_kernels.lora import Projection, lora_projections

    half = torch.bfloat16
    hidden, h64 = leaf(torch.randn(6, 16), torch.float32)
    weight = torch.randn(40, 16, device=DEVICE)
    targets = torch.randint(0, 40, (6,), device=DEVICE)
    proj = Projection(
        torch.randn(8, 16, device=DEVICE) / 4,
        None,
        torch.randn(2, 16, device=DEVICE, requires_grad=True),
        torch.randn(8, 2, device=DEVICE, requires_grad=True),
        1.0,
    )
    with torch.autocast(DEVICE, dtype=half):
        loss = fused_linear_cross_entropy(hidden, weight, targets)
        (out,) = lora_projections(hidden, [proj])
    (loss + out.float().sum() * 1e-3).backward()
    ref = torch.nn.functional.cross_entropy(h64 @ weight.double().t(), targets) + (
        (h64 @ proj.weight.double().t() + (h64 @ proj.lora_a.double().t()) @ proj.lora_b.double().t()).sum() * 1e-3
    )
    ref.backward()
    assert out.dtype == half and hidden.grad.dtype == torch.float32
    assert rel_err(loss, ref) < BOUND[half] and rel_err(hidden.grad, h64.grad) < BOUND[half], rng_seed

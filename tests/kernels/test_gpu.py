"""Real shapes on a GPU (run through the device tool; skipped on CPU): each kernel in bf16 against
an fp32/fp64 reference computed from the same bf16 inputs, packed varlen attention against
per-sample attention, and a whole patched model against the unpatched one."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.kernels.conftest import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BF16 = 1.5e-2


def bf16_pair(*shape, scale=1.0):
    a = (torch.randn(*shape, device="cuda") * scale).bfloat16().requires_grad_()
    return a, a.detach().float().requires_grad_()


def test_rmsnorm_and_swiglu_8b_shapes(rng_seed):
    from ftw_kernels.rmsnorm import rms_norm
    from ftw_kernels.swiglu import swiglu

    x, x32 = bf16_pair(8192, 4096, scale=3)
    w = (torch.rand(4096, device="cuda") + 0.5).bfloat16()
    y = rms_norm(x, w, 1e-5)
    ref = w.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    dy = torch.randn_like(ref)
    y.backward(dy.bfloat16())
    ref.backward(dy)
    assert rel_err(y, ref) < BF16 and rel_err(x.grad, x32.grad) < BF16, rng_seed
    g, g32 = bf16_pair(8192, 14336, scale=2)
    u, u32 = bf16_pair(8192, 14336)
    h = swiglu(g, u)
    ref = torch.nn.functional.silu(g32) * u32
    dh = torch.randn_like(ref)
    h.backward(dh.bfloat16())
    ref.backward(dh)
    assert rel_err(h, ref) < BF16 and rel_err(g.grad, g32.grad) < BF16 and rel_err(u.grad, u32.grad) < BF16, rng_seed


def test_rope_real_shape(rng_seed):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from ftw_kernels.rope import apply_rope

    pos = torch.cat([torch.arange(700), torch.arange(1348)]).expand(4, -1).cuda()
    inv = 1.0 / 500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128)
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    x, x32 = bf16_pair(4, 2048, 32, 128)
    y = apply_rope(x, cos, sin)
    ref = apply_rotary_pos_emb(x32.transpose(1, 2), x32.transpose(1, 2), cos.float(), sin.float())[0].transpose(1, 2)
    dy = torch.randn_like(ref)
    y.backward(dy.bfloat16())
    ref.backward(dy)
    assert rel_err(y, ref) < BF16 and rel_err(x.grad, x32.grad) < BF16, rng_seed


def test_fused_linear_cross_entropy_128k_vocab(rng_seed):
    from ftw_kernels.cross_entropy import fused_linear_cross_entropy

    h, h32 = bf16_pair(8192, 4096)
    w = (torch.randn(128256, 4096, device="cuda") * 0.02).bfloat16()
    t = torch.randint(0, 128256, (8192,), device="cuda")
    t[::7] = -100
    before = torch.cuda.max_memory_allocated()
    loss = fused_linear_cross_entropy(h, w, t)
    loss.backward()
    extra = torch.cuda.max_memory_allocated() - before
    ref = torch.nn.functional.cross_entropy(h32 @ w.float().t(), t)
    ref.backward()
    assert rel_err(loss, ref) < 2e-3 and rel_err(h.grad, h32.grad) < BF16, rng_seed
    assert extra < 3 * 2**30, f"{extra / 2**30:.2f} GiB: the full logits would be 8192 × 128256 × 4 B = 3.9 GiB"


def test_lora_mlp_and_qkv_8b_shapes(rng_seed):
    from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections

    def proj(out, inp):
        w = (torch.randn(out, inp, device="cuda") / inp**0.5).bfloat16()
        a = (torch.randn(16, inp, device="cuda") / inp**0.5).requires_grad_()
        b = (torch.randn(out, 16, device="cuda") * 0.1).requires_grad_()
        return Projection(w, None, a, b, 2.0)

    def ref_lora(x, p):
        return x @ p.weight.float().t() + p.scale * (x @ p.lora_a.t()) @ p.lora_b.t()

    x, x32 = bf16_pair(4096, 4096)
    gate, up, down = proj(14336, 4096), proj(14336, 4096), proj(4096, 14336)
    y = lora_gated_mlp(x, gate, up, down)
    y.backward(torch.ones_like(y))
    mine = [(p.lora_a.grad.clone(), p.lora_b.grad.clone()) for p in (gate, up, down)]
    for p in (gate, up, down):
        p.lora_a.grad = p.lora_b.grad = None
    ref = ref_lora(torch.nn.functional.silu(ref_lora(x32, gate)) * ref_lora(x32, up), down)
    ref.backward(torch.ones_like(ref))
    assert rel_err(y, ref) < BF16 and rel_err(x.grad, x32.grad) < BF16, rng_seed
    for (got_a, got_b), p in zip(mine, (gate, up, down)):
        assert got_a.dtype == got_b.dtype == torch.float32
        assert rel_err(got_a, p.lora_a.grad) < 2 * BF16 and rel_err(got_b, p.lora_b.grad) < 2 * BF16, rng_seed
    q, k, v = proj(4096, 4096), proj(1024, 4096), proj(1024, 4096)
    outs = lora_projections(x, [q, k, v])
    refs = [ref_lora(x32, p) for p in (q, k, v)]
    for o, r in zip(outs, refs):
        assert rel_err(o, r) < BF16, rng_seed


def test_bordered_qkv_and_gate_up_8b_shapes(rng_seed):
    """The bordered weights (`FTW_BORDERED_LORA=1`) over a norm with room, in bf16 at 8B's shapes: outputs, the
    norm output's grad and the adapters' grads against fp32 references."""
    from ftw_kernels import bordered
    from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections
    from ftw_kernels.rmsnorm import rms_norm

    def proj(out, inp):
        w = torch.nn.Parameter((torch.randn(out, inp, device="cuda") / inp**0.5).bfloat16(), requires_grad=False)
        a = (torch.randn(16, inp, device="cuda") / inp**0.5).requires_grad_()
        return Projection(w, None, a, (torch.randn(out, 16, device="cuda") * 0.1).requires_grad_(), 2.0)

    def ref_lora(x, p):
        return x @ p.weight.float().t() + p.scale * (x @ p.lora_a.t()) @ p.lora_b.t()

    def check(group, room, fused, reference):
        y = rms_norm(x0, norm_w, 1e-5, room)
        assert y.stride(0) == 4096 + room
        y.retain_grad()
        y32 = y.detach().float().requires_grad_()
        outs, refs = fused(y), reference(y32)
        grads = [torch.randn_like(r) for r in refs]
        torch.autograd.backward(outs, [g.bfloat16() for g in grads])
        mine = [(p.lora_a.grad.clone(), p.lora_b.grad.clone()) for p in group]
        for p in group:
            p.lora_a.grad = p.lora_b.grad = None
        torch.autograd.backward(refs, grads)
        assert all(rel_err(o, r) < BF16 for o, r in zip(outs, refs)) and rel_err(y.grad, y32.grad) < BF16, rng_seed
        for (got_a, got_b), p in zip(mine, group):
            assert rel_err(got_a, p.lora_a.grad) < 2 * BF16 and rel_err(got_b, p.lora_b.grad) < 2 * BF16, rng_seed

    x0 = torch.randn(8192, 4096, device="cuda").bfloat16().requires_grad_()
    norm_w = (torch.rand(4096, device="cuda") + 0.5).bfloat16()
    qkv = [proj(4096, 4096), proj(1024, 4096), proj(1024, 4096)]
    room = bordered.border_group([p.weight for p in qkv], [16] * 3)
    check(qkv, room, lambda y: lora_projections(y, qkv), lambda y: [ref_lora(y, p) for p in qkv])
    gate, up, down = proj(14336, 4096), proj(14336, 4096), proj(4096, 14336)
    room = bordered.border_group([gate.weight, up.weight], [16] * 2)
    check(
        [gate, up, down],
        room,
        lambda y: [lora_gated_mlp(y, gate, up, down)],
        lambda y: [ref_lora(torch.nn.functional.silu(ref_lora(y, gate)) * ref_lora(y, up), down)],
    )


def test_varlen_attention_keeps_packed_samples_apart(rng_seed):
    from ftw_kernels.attention import varlen_attention_forward

    lengths = [300, 1000, 748, 2048]  # rows of 2048: [300, 1000, 748] and [2048]
    pos = torch.stack([torch.cat([torch.arange(n) for n in lengths[:3]]), torch.arange(2048)]).cuda()
    q = torch.randn(2, 32, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    module = torch.nn.Module()
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=128**-0.5, position_ids=pos)
    do = torch.randn_like(out)
    out.backward(do)
    grads = [t.grad.clone() for t in (q, k, v)]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    refs = []
    for row, spans in ((0, [(0, 300), (300, 1300), (1300, 2048)]), (1, [(0, 2048)])):
        for s, e in spans:
            o = torch.nn.functional.scaled_dot_product_attention(
                q32[row : row + 1, :, s:e],
                k32[row : row + 1, :, s:e],
                v32[row : row + 1, :, s:e],
                is_causal=True,
                enable_gqa=True,
            )
            refs.append((row, s, e, o))
    ref = torch.zeros(2, 32, 2048, 128, device="cuda")
    for row, s, e, o in refs:
        ref[row, :, s:e] = o[0]
    ref = ref.transpose(1, 2)
    ref.backward(do.float())
    assert rel_err(out, ref) < BF16, rng_seed
    for got, t in zip(grads, (q32, k32, v32)):
        assert rel_err(got, t.grad) < 2 * BF16, rng_seed


@pytest.mark.parametrize("rows", [2, 1], ids=["full-length-rows", "equal-samples-packed"])
def test_equal_segments_run_cudnn_attention_like_the_reference(rows, rng_seed):
    """Full-length rows, or full-length samples packed into one row, take cuDNN's fused attention, grouped kv
    heads as they are, over the model's (b, s, h, d) memory: output and gradients as fp32 causal attention's
    over each 2048-token sample."""
    from ftw_kernels.attention import CUDNN_REFUSED, varlen_attention_forward

    seq = 4096 // rows
    leaves = [
        torch.randn(rows, seq, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (32, 8, 8)
    ]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    pos = torch.arange(2048, device="cuda").repeat(seq // 2048).expand(rows, -1)
    out, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=128**-0.5, position_ids=pos)
    assert not CUDNN_REFUSED, CUDNN_REFUSED
    names, pending = [], [out.grad_fn]
    while pending and len(names) < 20:  # the autograd nodes just above the output
        fn = pending.pop()
        names.append(type(fn).__name__)
        pending += [f for f, _ in fn.next_functions if f is not None]
    assert any("Cudnn" in n for n in names), names
    do = torch.randn_like(out)
    out.backward(do)
    refs = [t.detach().float().requires_grad_() for t in leaves]
    samples = [t.reshape(2, 2048, t.shape[2], 128).transpose(1, 2) for t in refs]  # the two 2048-token samples
    ref = torch.nn.functional.scaled_dot_product_attention(*samples, is_causal=True, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(rows, seq, 32, 128)
    ref.backward(do.float())
    assert rel_err(out, ref) < BF16, rng_seed
    for got, want in zip(leaves, refs):
        assert rel_err(got.grad, want.grad) < 2 * BF16, rng_seed


def test_varlen_attention_keeps_grouped_kv_heads_for_backward():
    """k and v are saved at their 8 heads: expanded to the 32 query heads they would keep 3 GiB more a
    step at Llama-8B (4 × 2048 tokens); only q and the output are query-head wide."""
    from ftw_kernels.attention import varlen_attention_forward

    q = torch.randn(2, 32, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.cat([torch.arange(1000), torch.arange(1048)]).cuda().expand(2, -1)  # packed: the flash kernel
    shapes = []

    def keep(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, None, scaling=128**-0.5, position_ids=pos)
    wide = [s for s in shapes if s[-2:] == (32, 128)]
    narrow = [s for s in shapes if s[-2:] == (8, 128)]
    assert len(wide) == 2 and len(narrow) == 2, shapes
    out.sum().backward()
    assert k.grad.shape == k.shape and torch.isfinite(k.grad).all()


def test_patched_model_matches_unpatched_on_gpu(rng_seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftw_kernels import apply_kernels
    from schemas.config import TrainingConfig

    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    ref = get_peft_model(
        base,
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    for n, p in ref.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model = copy.deepcopy(ref)
    applied = apply_kernels(model, TrainingConfig(base_model="x", learning_rate=1e-4, adapter="lora"))
    assert "varlen_attention" in applied and "lora_mlp" in applied and "fused_linear_cross_entropy" in applied
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    pos = torch.stack([torch.cat([torch.arange(400), torch.arange(624)]), torch.arange(1024)]).cuda()
    labels = ids.clone()
    labels[0, 400] = -100
    losses, grads = [], []
    for m in (ref.train(), model.train()):
        loss = m(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten().float() for n, p in m.named_parameters() if p.grad is not None]))
    assert rel_err(losses[1], losses[0]) < 5e-3, rng_seed
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99, rng_seed


@pytest.mark.parametrize("gemm", ["grouped_mm", "triton"])
def test_moe_lora_experts_olmoe_shape(gemm, rng_seed):
    """Both implementations of the experts' LoRA step in bf16 at OLMoE-1B-7B's expert shapes against
    transformers' eager experts over W + s·B·A in fp32, from the same bf16 inputs; a few experts get
    no tokens (their LoRA gradients are 0, whatever the grouped GEMM leaves in an empty group)."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    from ftw_kernels.moe import scattermoe_lora

    experts, hidden, inter, rank, k, tokens = 64, 2048, 1024, 16, 8, 2048
    scores = torch.randn(tokens, experts, device="cuda").softmax(-1)
    scores[:, :4] = 0  # experts 0-3 idle
    weights, index = torch.topk(scores, k, dim=-1)
    w_gu = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5).bfloat16()
    w_d = (torch.randn(experts, hidden, inter, device="cuda") / inter**0.5).bfloat16()
    shapes = [(experts, rank, hidden), (experts, 2 * inter, rank), (experts, rank, inter), (experts, hidden, rank)]
    factors = [(torch.randn(*s, device="cuda") * 0.05).requires_grad_() for s in shapes]
    x, x32 = bf16_pair(tokens, hidden)
    lora = ((factors[0], factors[1], 2.0), (factors[2], factors[3], 2.0))
    y = scattermoe_lora(x, index, weights.bfloat16(), w_gu, w_d, lora, gemm)
    dy = torch.randn(tokens, hidden, device="cuda")
    y.backward(dy.bfloat16())
    grads = [f.grad.clone() for f in factors]
    for f in factors:
        f.grad = None
    cfg = OlmoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=experts, num_experts_per_tok=k)
    cfg._experts_implementation = "eager"
    ref = OlmoeExperts(cfg).cuda()
    del ref.gate_up_proj, ref.down_proj
    ref.gate_up_proj = w_gu.float() + 2.0 * factors[1] @ factors[0]
    ref.down_proj = w_d.float() + 2.0 * factors[3] @ factors[2]
    y_ref = ref(x32, index, weights)
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < BF16 and rel_err(x.grad, x32.grad) < BF16, rng_seed
    for got, f in zip(grads, factors):
        assert rel_err(got, f.grad) < 2 * BF16, rng_seed
        assert torch.count_nonzero(got[:4]) == 0, rng_seed


@pytest.mark.parametrize("gemm", ["triton", "grouped_mm"])
def test_patched_moe_model_matches_unpatched_on_gpu(rng_seed, gemm, monkeypatch):
    """A Qwen3-MoE with every kernel (varlen attention, the experts of either GEMMs, the fused loss with
    the router's aux loss) against PEFT + transformers' grouped_mm, bf16, packed rows."""
    monkeypatch.setenv("FTW_MOE_GEMM", gemm)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from ftw_kernels import apply_kernels
    from schemas.config import TrainingConfig

    cfg = Qwen3MoeConfig(
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        moe_intermediate_size=512,
        num_experts=32,
        num_experts_per_tok=4,
        vocab_size=32000,
        output_router_logits=True,
    )
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    base.set_experts_implementation("grouped_mm")
    ref = get_peft_model(
        base,
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )
    for n, p in ref.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model = copy.deepcopy(ref)
    applied = apply_kernels(model, TrainingConfig(base_model="x", learning_rate=1e-4, adapter="lora"))
    assert applied[0] == {"triton": "scattermoe_lora", "grouped_mm": "grouped_mm_lora"}[gemm] and {
        "varlen_attention",
        "lora_qkv",
        "fused_linear_cross_entropy",
    } <= set(applied)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    pos = torch.stack([torch.cat([torch.arange(400), torch.arange(624)]), torch.arange(1024)]).cuda()
    losses, aux, grads = [], [], []
    for m in (ref.train(), model.train()):
        out = m(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
        out.loss.backward()
        losses.append(out.loss.detach())
        aux.append(out.aux_loss.detach())
        grads.append(torch.cat([p.grad.flatten().float() for n, p in m.named_parameters() if p.grad is not None]))
    assert rel_err(losses[1], losses[0]) < 5e-3 and rel_err(aux[1], aux[0]) < 5e-3, rng_seed
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99, rng_seed

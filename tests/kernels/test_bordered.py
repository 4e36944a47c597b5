"""LoRA over bordered weights (kernels/ftw_kernels/bordered.py, on unless `FTW_BORDERED_LORA=0`): the same loss,
gradients and training curve as the fused projections without borders; each projection's forward one GEMM over
[x | x·Aᵀ] with no rank-r output written and added; the room beside a tensor written only where a norm made it;
a weight whose data was replaced since falls back to the plain path; not installed where it does not hold."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from ftw_kernels import apply_kernels, bordered
from ftw_kernels.lora import Projection, lora_projections
from ftw_kernels.rmsnorm import rms_norm
from tests.kernels.conftest import rel_err
from tests.kernels.test_apply_kernels import (
    BORDERED,
    FULL,
    loss_and_grads,
    loss_curve,
    packed_batch,
    tiny,
    training_config,
)


def _layers(model):
    return model.get_base_model().model.layers


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config, Qwen3Config])  # Qwen2: q, k, v with biases
def test_bordered_model_matches_reference(config_cls):
    ref = tiny(config_cls)
    model = copy.deepcopy(ref)
    assert apply_kernels(model, training_config(use_kernels=True)) == FULL
    for layer, ref_layer in zip(_layers(model), _layers(ref)):
        attn, mlp = layer.self_attn, layer.mlp
        for name, m in [*((n, getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")), ("gate_proj", mlp.gate_proj)]:
            w = m.base_layer.weight
            assert bordered.border_of(w) is not None and not w.is_contiguous(), name
        assert torch.equal(attn.k_proj.base_layer.weight, ref_layer.self_attn.k_proj.base_layer.weight)
        assert getattr(layer.input_layernorm, bordered.ROOM) == 16  # q, k, v at rank 4: 12, aligned to 8
        assert getattr(layer.post_attention_layernorm, bordered.ROOM) == 8
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    with _Matmuls() as seen:
        model(**batch)
    # per layer, q, k, v over [x | x·Aᵀ] prefixes of 4, 8, 12 columns and gate, up over 4 and 8, each aligned to
    # 8; down over its 48 inputs (the loss head, contracting over the vocabulary, left out)
    wide = sorted(k - 32 for op, _, k, _ in seen.seen if op in ("mm", "addmm") and 32 < k <= 48)
    assert wide == sorted([8, 8, 16, 8, 8, 16] * 2)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    assert ref_grads.keys() == grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


def test_training_steps_reach_the_borders():
    """Four fused-AdamW steps (the weights written behind the version counter): each step's s·B lands in the
    borders, and the loss curve is the unpatched model's."""
    reference = loss_curve(tiny(LlamaConfig), fused=True)
    model = tiny(LlamaConfig)
    assert apply_kernels(model, training_config(use_kernels=True))[-2:] == BORDERED
    torch.testing.assert_close(
        torch.tensor(loss_curve(model, fused=True)), torch.tensor(reference), rtol=1e-4, atol=1e-5
    )


def test_gradient_checkpointing_over_bordered_layers():
    ref = tiny(LlamaConfig)
    model = copy.deepcopy(ref)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().enable_input_require_grads()
    assert apply_kernels(model, training_config(use_kernels=True, gradient_checkpointing=True))[-2:] == BORDERED
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


def test_inference_eval_generation_and_disabled_adapters():
    """Inference mode (the copies cast at each use, written into the borders), eval, generation with a KV cache
    (the original forwards over the strided weights) and PEFT's disable_adapter (the DPO reference: the plain
    Linears) give the unbordered model's numbers."""
    ref = tiny(LlamaConfig)
    model = copy.deepcopy(ref)
    apply_kernels(model, training_config(use_kernels=True))
    batch = packed_batch()
    with torch.inference_mode():
        assert rel_err(model(**batch).loss, ref(**batch).loss) < 1e-5
    model.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(model(**batch).loss, ref(**batch).loss) < 1e-5
        prompt = batch["input_ids"][:1, :4]
        generated = [m.generate(input_ids=prompt, max_new_tokens=3, do_sample=False) for m in (model, ref)]
        assert torch.equal(*generated)
        with model.disable_adapter(), ref.disable_adapter():
            assert rel_err(model(**batch).loss, ref(**batch).loss) < 1e-5


def test_adapter_saved_from_a_bordered_model_is_the_same(tmp_path):
    from safetensors.torch import load_file

    ref = tiny(LlamaConfig)
    model = copy.deepcopy(ref)
    apply_kernels(model, training_config(use_kernels=True))
    model.save_pretrained(tmp_path / "bordered")
    ref.save_pretrained(tmp_path / "ref")
    got, want = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("bordered", "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---- the fused function over a norm with room ---------------------------------------------------
TOKENS, HIDDEN = 24, 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _group(dtype=torch.float32, bias=False) -> list[Projection]:
    made = []
    for out, rank, scale in ((32, 4, 2.0), (16, 2, 0.5), (16, 4, 1.0)):
        w = torch.randn(out, HIDDEN, dtype=dtype, device=DEVICE) / HIDDEN**0.5
        b = torch.randn(out, dtype=dtype, device=DEVICE) if bias else None
        a = (torch.randn(rank, HIDDEN, device=DEVICE) / HIDDEN**0.5).requires_grad_()
        lora_b = torch.randn(out, rank, device=DEVICE).requires_grad_()
        made.append(Projection(torch.nn.Parameter(w, requires_grad=False), b, a, lora_b, scale))
    return made


def _reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    x = x.double()
    y = x @ p.weight.double().t() + p.scale * (x @ p.lora_a.double().t()) @ p.lora_b.double().t()
    return y + p.bias.double() if p.bias is not None else y


class _Matmuls(TorchDispatchMode):
    """Each matmul: (op, rows, contraction length, whether it adds into an existing output)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, int, int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            left = args[0] if name == "mm" else args[1]
            self.seen.append((name, left.shape[0], left.shape[1], name == "addmm_"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [False, True])
def test_each_projection_is_one_gemm_over_the_bordered_weight(bias, rng_seed):
    made = _group(bias=bias)
    room = bordered.border_group([p.weight for p in made], [p.lora_a.shape[0] for p in made])
    assert room == 16  # ranks 4, 2, 4: 10 columns, aligned to 8
    x0 = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
    norm_weight = torch.rand(HIDDEN, device=DEVICE) + 0.5
    y = rms_norm(x0, norm_weight, 1e-6, room)
    assert bordered.room_of(y) == room and y.stride(0) == HIDDEN + room
    y.data.as_strided((TOKENS, HIDDEN + room), (HIDDEN + room, 1))[:, HIDDEN:] = float("nan")  # what it may hold
    with _Matmuls() as forward:
        outs = lora_projections(y, made)
    # x·[A_q;A_k;A_v]ᵀ once, then q over [x | xa_q], k over [x | xa_q | xa_k], v over all (each prefix aligned
    # to 8 columns, the padding zero): nothing added after
    assert forward.seen == [("mm", TOKENS, HIDDEN, False)] + [
        ("addmm" if bias else "mm", TOKENS, HIDDEN + k, False) for k in (8, 8, 16)
    ]
    y64 = y.detach().double().requires_grad_()
    refs = [_reference(y64, p) for p in made]
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < 1e-6, rng_seed
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    fused = [t.grad.clone() for p in made for t in (p.lora_a, p.lora_b)]
    for p in made:
        p.lora_a.grad = p.lora_b.grad = None
    torch.autograd.backward(refs, [g.double() for g in grads])
    for got, t in zip(fused, [t for p in made for t in (p.lora_a, p.lora_b)]):
        assert rel_err(got, t.grad) < 1e-6, rng_seed
    (dy_norm,) = torch.autograd.grad(rms_norm(x0, norm_weight, 1e-6), x0, y64.grad.float())
    assert rel_err(x0.grad, dy_norm) < 1e-6, rng_seed


def test_columns_beside_an_unmarked_input_are_never_written():
    """x a view into a wider tensor that holds other data: without a norm's mark, the plain path, and the
    columns beside x keep what they held."""
    made = _group()
    bordered.border_group([p.weight for p in made], [p.lora_a.shape[0] for p in made])
    wide = torch.randn(TOKENS, HIDDEN + 10, device=DEVICE)
    before = wide.clone()
    x = wide[:, :HIDDEN]
    with _Matmuls() as seen:
        outs = lora_projections(x, made)
    assert torch.equal(wide, before)
    assert all(k == HIDDEN for _, _, k, _ in seen.seen if k > 10)  # the base GEMMs over x alone
    for out, p in zip(outs, made):
        assert rel_err(out, _reference(x, p)) < 1e-6


def test_a_weight_replaced_since_takes_the_plain_path():
    made = _group()
    room = bordered.border_group([p.weight for p in made], [p.lora_a.shape[0] for p in made])
    made[1].weight.data = made[1].weight.data.contiguous()  # e.g. a move to another device
    assert bordered.border_of(made[1].weight) is None
    y = rms_norm(torch.randn(TOKENS, HIDDEN, device=DEVICE), torch.ones(HIDDEN, device=DEVICE), 1e-6, room)
    for out, p in zip(lora_projections(y, made), made):
        assert rel_err(out, _reference(y, p)) < 1e-6


def test_not_installed_where_it_does_not_hold(monkeypatch):
    monkeypatch.setenv(bordered.ENV, "0")
    assert BORDERED[0] not in apply_kernels(tiny(LlamaConfig), training_config(use_kernels=True))  # switched off
    monkeypatch.delenv(bordered.ENV)
    compiled = apply_kernels(tiny(LlamaConfig), training_config(use_kernels=True, torch_compile=True))
    assert "lora_qkv" in compiled and BORDERED[0] not in compiled
    partial = apply_kernels(
        tiny(LlamaConfig, targets=["q_proj", "v_proj", "up_proj"]), training_config(use_kernels=True)
    )
    assert not set(BORDERED) & set(partial)  # k, gate unadapted: the groups are not fused
    no_mlp = apply_kernels(tiny(LlamaConfig), training_config(use_kernels=True, lora_mlp_kernel=False))
    assert no_mlp[-1:] == ["bordered_qkv"]
    shared = tiny(LlamaConfig)  # gate and up inside one buffer (as a fused checkpoint may load them)
    for layer in _layers(shared):
        gate, up = layer.mlp.gate_proj.base_layer.weight, layer.mlp.up_proj.base_layer.weight
        both = torch.cat([gate.data, up.data])
        gate.data, up.data = both[: gate.shape[0]], both[gate.shape[0] :]
    assert apply_kernels(shared, training_config(use_kernels=True))[-1:] == ["bordered_qkv"]


def test_without_the_copy_cache_the_borders_are_written_at_each_use(monkeypatch):
    """Where adapter copies are not cached (torch.distributed, inference mode), each call writes s·B into the
    borders afresh: a B changed in place reaches the next call."""
    from ftw_kernels import adapter_copies

    monkeypatch.setattr(adapter_copies, "ENABLED", False)
    made = _group()
    room = bordered.border_group([p.weight for p in made], [p.lora_a.shape[0] for p in made])
    y = rms_norm(torch.randn(TOKENS, HIDDEN, device=DEVICE), torch.ones(HIDDEN, device=DEVICE), 1e-6, room)
    lora_projections(y, made)
    with torch.no_grad():
        made[2].lora_b.mul_(-2.0)
    for out, p in zip(lora_projections(y, made), made):
        assert rel_err(out, _reference(y, p)) < 1e-6


def test_the_norm_output_stays_usable_after_its_room_is_written():
    """Writing x·Aᵀ beside the rows is no in-place change of the norm's output: another op may still read it,
    and its gradient still flows (autograd refuses a changed view made by a custom Function)."""
    made = _group()
    room = bordered.border_group([p.weight for p in made], [p.lora_a.shape[0] for p in made])
    x0 = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
    y = rms_norm(x0, torch.ones(HIDDEN, device=DEVICE), 1e-6, room)
    outs = lora_projections(y, made)
    (sum(o.sum() for o in outs) + (y * y).sum()).backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all()


def test_what_the_backward_keeps_is_dense():
    """The input and x·Aᵀ are kept as one tensor (the norm's rows with their room), dense: activation offloading
    (`gradient_checkpointing: offload`) moves dense tensors to the host and keeps strided ones on the GPU."""
    from worker.train.offload import _dense

    made = _group()
    room = bordered.border_group([p.weight for p in made], [p.lora_a.shape[0] for p in made])
    x0 = torch.randn(TOKENS, HIDDEN, device=DEVICE, requires_grad=True)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    y = rms_norm(x0, torch.ones(HIDDEN, device=DEVICE), 1e-6, room)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = lora_projections(y, made)
    inputs = [t for t in kept if t.shape[0] == TOKENS]
    assert [t.shape for t in inputs] == [(TOKENS, HIDDEN + room)] and all(_dense(t) for t in inputs)
    sum(o.sum() for o in outs).backward()
    for p in made:
        assert rel_err(p.lora_a.grad, torch.autograd.grad(_reference(y, p).sum(), p.lora_a)[0]) < 1e-6


def test_a_projection_called_apart_from_its_group_takes_the_plain_path():
    """k's border lies after q's: called alone, its x·Aᵀ would land where q's does, so it is not bordered there."""
    made = _group()
    room = bordered.border_group([p.weight for p in made], [p.lora_a.shape[0] for p in made])
    y = rms_norm(torch.randn(TOKENS, HIDDEN, device=DEVICE), torch.ones(HIDDEN, device=DEVICE), 1e-6, room)
    lora_projections(y, made)  # the borders filled
    for alone in ([made[1]], [made[2]], [made[2], made[0]]):
        for out, p in zip(lora_projections(y, alone), alone):
            assert rel_err(out, _reference(y, p)) < 1e-6

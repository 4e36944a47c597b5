"""QLoRA through the fused LoRA functions (kernels/ftw_kernels/qlora.py) on real bitsandbytes nf4 weights (its
CPU backend quantises and dequantises here; on a GPU the same tests run on CUDA, through the shared
dequantisation buffer), against PEFT's own bitsandbytes LoRA layers on the same
tiny model: loss and adapter gradients, packed rows, gradient checkpointing, and what autograd
keeps for backward (the packed 4-bit weights, never a dequantised copy)."""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from ftw_kernels import apply_kernels  # noqa: E402
from ftw_kernels.qlora import is_4bit  # noqa: E402
from schemas.config import TrainingConfig  # noqa: E402
from tests.conftest import quantise_linears_8bit, randomise_lora_b  # noqa: E402
from tests.kernels.conftest import rel_err  # noqa: E402
from tests.kernels.test_apply_kernels import DEVICE, TARGETS, VOCAB, loss_and_grads, packed_batch  # noqa: E402
from worker.train.warmup import quantise_linears  # noqa: E402  # what load_in_4bit builds, on any device

FUSED = ["lora_mlp", "lora_qkv", "lora_o", "dequant_4bit"]


def tiny_qlora(
    dtype: torch.dtype = torch.float32,
    checkpointing: bool = False,
    reentrant: bool = False,
    dropout: float = 0.0,
    bits: int = 4,
) -> torch.nn.Module:
    """A tiny Llama whose Linears (not the output layer) are bitsandbytes nf4 (`bits` 4, what `load_in_4bit` loads)
    or int8 (8, `load_in_8bit`), under PEFT's bitsandbytes LoRA layers."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,  # whole 64-value blocks per row: bitsandbytes' CPU kernel mis-reads blocks across rows
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(DEVICE)
    if bits == 4:
        quantise_linears(model, "nf4", True, dtype)
    else:
        quantise_linears_8bit(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    randomise_lora_b(model, std=0.2)
    assert type(model.get_base_model().model.layers[0].mlp.up_proj).__module__ == "peft.tuners.lora.bnb"
    return model.train()


def qlora_config(**kw: object) -> TrainingConfig:
    base = {"base_model": "tiny", "learning_rate": 1e-3, "adapter": "qlora", "load_in_4bit": True, "use_kernels": True}
    return TrainingConfig.model_validate({**base, **kw})


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_fused_qlora_matches_peft_bitsandbytes(checkpointing: bool) -> None:
    ref = tiny_qlora(checkpointing=checkpointing)
    model = copy.deepcopy(ref)
    applied = apply_kernels(model, qlora_config(gradient_checkpointing=checkpointing))
    assert set(FUSED) <= set(applied), applied
    batch = packed_batch()  # two samples packed in row 0: position ids restart
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 modules × 2 layers
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


def test_bf16_fused_qlora_follows_peft() -> None:
    """bf16 weights, fp32 adapters (PEFT's default): the fused path casts the adapters to bf16 where
    PEFT casts the input to fp32, so the two agree to bf16 rounding: over all adapter gradients
    together, and each tensor within twice that (a small tensor's own rounding weighs more)."""
    ref = tiny_qlora(torch.bfloat16)
    model = copy.deepcopy(ref)
    assert set(FUSED) <= set(apply_kernels(model, qlora_config()))
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-2
    assert ref_grads.keys() == grads.keys()
    names = sorted(grads)
    every, every_ref = (torch.cat([g[n].flatten() for n in names]) for g in (grads, ref_grads))
    assert rel_err(every, every_ref) < 5e-2
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-1, name


def test_no_dequantised_weight_is_kept_for_backward() -> None:
    """Everything autograd saves in a forward: the packed 4-bit weights appear, their dense
    (out × in) form never does."""
    model = tiny_qlora()
    apply_kernels(model, qlora_config())
    weights = [p for p in model.parameters() if is_4bit(p)]
    dense_shapes = {tuple(p.quant_state.shape) for p in weights}
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    batch = packed_batch()  # 20 tokens: no activation has a weight's shape
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    assert saved and not [tuple(t.shape) for t in saved if tuple(t.shape) in dense_shapes]


def test_activation_offloading_keeps_the_4bit_weights_usable() -> None:
    """`activation_offloading: true` runs the forward under saved-tensor hooks that hand back what
    they do not move detached, and a detached `Params4bit` is a plain tensor without its quant_state:
    the fused functions must not route the 4-bit weights through those hooks."""
    from worker.train.offload import ActivationOffloader

    ref = tiny_qlora()
    model = copy.deepcopy(ref)
    apply_kernels(model, qlora_config(activation_offloading=True))
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    offloader = ActivationOffloader(torch.device(DEVICE), min_bytes=1024, keep_last=1)
    model.zero_grad(set_to_none=True)
    with offloader.saving() as stats:
        loss = model(**batch).loss
    loss.backward()
    assert stats.offloaded_tensors > 0  # the hooks did move activations
    assert rel_err(loss.detach(), ref_loss) < 1e-5
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert rel_err(p.grad, ref_grads[name]) < 1e-4, name


def test_fp8_matmuls_over_the_4bit_base_follow_peft_and_keep_it_packed() -> None:
    """`fp8_base_weights` with QLoRA: each 4-bit projection stays packed and its matmuls run over the per-channel
    float8 quantisation of its dequantised weight: the loss and adapter gradients follow PEFT's bitsandbytes
    layers within float8's rounding (e4m3 keeps 3 mantissa bits), and autograd keeps neither a dense nor a
    float8 copy of a weight (the same shapes, either orientation)."""
    from ftw_kernels.base_weight import FP8_MATMULS

    ref = tiny_qlora()
    model = copy.deepcopy(ref)
    assert {*FUSED, "fp8_base"} <= set(apply_kernels(model, qlora_config(fp8_base_weights=True)))
    weights = [p for p in model.parameters() if is_4bit(p)]
    assert len(weights) == 2 * 7 and all(getattr(w, FP8_MATMULS, False) for w in weights)
    assert not any(getattr(p, FP8_MATMULS, False) for p in ref.parameters())
    shapes = {tuple(w.quant_state.shape) for w in weights} | {tuple(w.quant_state.shape)[::-1] for w in weights}
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, grads = loss_and_grads(model, batch)
    assert saved and not [tuple(t.shape) for t in saved if tuple(t.shape) in shapes]
    assert 0 < rel_err(loss, ref_loss) < 2e-3  # not 0: the matmuls did run in float8
    assert grads.keys() == ref_grads.keys()
    flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, ref_grads))
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.995
    assert rel_err(flat, ref_flat) < 0.1


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs CUDA with fp8 (≥ 8.9)"
)
def test_bf16_fp8_matmuls_over_the_4bit_base_run_scaled_mm_and_follow_peft() -> None:
    """The same in bf16 on a GPU, where the matmuls are `torch._scaled_mm`: float8's rounding on top of bf16's."""
    ref = tiny_qlora(torch.bfloat16)
    model = copy.deepcopy(ref)
    assert "fp8_base" in apply_kernels(model, qlora_config(fp8_base_weights=True))
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-2
    flat, ref_flat = (torch.cat([g[n].float().flatten() for n in sorted(g)]) for g in (grads, ref_grads))
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.99

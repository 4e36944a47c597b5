"""The registry on real (tiny) PEFT models: what it applies and when, and that a patched model
computes the same loss and adapter gradients as the unpatched one, packed batches included."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from ftw_kernels import apply_kernels, lora, lora_products, patches, registry
from ftw_kernels.precision import in_backward
from schemas.config import TrainingConfig
from tests.conftest import randomise_lora_b
from tests.kernels.conftest import rel_err

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 97
HIDDEN_SIZE = 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 models: no varlen attention either way
BORDERED = ["bordered_qkv", "bordered_mlp"]  # kernels/ftw_kernels/bordered.py, on by default
FULL = ["rmsnorm", "lora_mlp", "rope", "lora_qkv", "lora_o", "residual_fold", "fused_linear_cross_entropy", *BORDERED]


def tiny(config_cls, dropout: float = 0.0, targets=TARGETS, modules_to_save=None, use_dora=False, **extra):
    torch.manual_seed(0)
    cfg = config_cls(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=targets,
            modules_to_save=modules_to_save,
            use_dora=use_dora,
        ),
    )
    randomise_lora_b(model, std=0.2)
    return model.to(DEVICE).train()


def training_config(**kw) -> TrainingConfig:
    return TrainingConfig(base_model="tiny", learning_rate=1e-3, adapter="lora", **kw)


def packed_batch():
    """Row 0: two samples packed back to back (position ids restart); row 1: one sample.
    use_cache=False: with a KV cache transformers does not split packed rows (the reference would
    attend across samples)."""
    ids = torch.randint(0, VOCAB, (2, 10))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], list(range(10))])
    labels = ids.clone()
    labels[0, :2] = -100
    return dict(input_ids=ids.to(DEVICE), position_ids=pos.to(DEVICE), labels=labels.to(DEVICE), use_cache=False)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_matches_reference(ref, model, batch) -> dict[str, torch.Tensor]:
    """The patched model's loss and every grad against the unpatched one's; returns the grads."""
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    assert ref_grads.keys() == grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name
    return grads


@pytest.mark.parametrize(
    "config_cls,extra",
    [(LlamaConfig, {}), (MistralConfig, {"sliding_window": 6}), (Qwen2Config, {}), (Qwen3Config, {})],
)
def test_patched_model_matches_reference(config_cls, extra, caplog):
    ref = tiny(config_cls, **extra)
    model = copy.deepcopy(ref)
    with caplog.at_level(logging.INFO, logger="ftw.kernels"):
        applied = apply_kernels(model, training_config(use_kernels=True))
    assert applied == FULL  # fp32: no varlen attention (flash kernels are half precision)
    assert "kernels applied" in caplog.text and "lora_mlp" in caplog.text
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 modules × 2 layers
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])  # Qwen2: q, k, v with biases
def test_unbordered_model_matches_reference(config_cls, monkeypatch):
    """The fused projections over weights as loaded (`FTW_BORDERED_LORA=0`; also what several processes, a
    quantised base or torch_compile run): the same loss and grads as the unpatched model."""
    from ftw_kernels import bordered

    monkeypatch.setenv(bordered.ENV, "0")
    ref = tiny(config_cls)
    model = copy.deepcopy(ref)
    assert apply_kernels(model, training_config(use_kernels=True)) == [k for k in FULL if k not in BORDERED]
    assert_matches_reference(ref, model, packed_batch())


def test_lora_on_the_output_layer_keeps_the_unfused_loss():
    """A LoRA-wrapped lm_head adds its own term to the logits: the fused loss must not skip it."""
    ref = tiny(LlamaConfig, targets=[*TARGETS, "lm_head"])
    model = copy.deepcopy(ref)
    applied = apply_kernels(model, training_config(use_kernels=True))
    assert "fused_linear_cross_entropy" not in applied and "rmsnorm" in applied
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    loss, grads = loss_and_grads(model, batch)
    assert rel_err(loss, ref_loss) < 1e-5 and any("lm_head" in n for n in grads)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


def test_trained_output_layer_gets_its_gradient_from_the_fused_loss():
    """lora_modules_to_save: [lm_head] trains a copy of the output layer: the fused loss computes
    its weight gradient (fp32 accumulation) instead of skipping it."""
    ref = tiny(LlamaConfig, modules_to_save=["lm_head"])
    model = copy.deepcopy(ref)
    assert "fused_linear_cross_entropy" in apply_kernels(model, training_config(use_kernels=True))
    assert any("lm_head" in name for name in assert_matches_reference(ref, model, packed_batch()))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_recomputes_the_patched_layers_but_their_mlp_tail(reentrant, monkeypatch):
    """The recompute's output is only autograd's root (or thrown away), so the SwiGLU and the down projection's
    GEMM run in the forward only; every grad is still that of the unpatched model without checkpointing."""
    ref = tiny(LlamaConfig)
    model = copy.deepcopy(ref)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.get_base_model().enable_input_require_grads()
    assert "residual_fold" in apply_kernels(model, training_config(use_kernels=True, gradient_checkpointing=True))
    base_gemms: list[tuple[bool, int]] = []  # (inside backward, the weight) of each base GEMM of an unbordered input
    real_linear = lora_products.linear
    monkeypatch.setattr(
        lora_products, "linear", lambda x, w, *a: base_gemms.append((in_backward(), id(w))) or real_linear(x, w, *a)
    )
    swiglus: list[bool] = []  # inside backward, for each SwiGLU forward
    real_swiglu = lora.swiglu_forward_dropped
    monkeypatch.setattr(
        lora, "swiglu_forward_dropped", lambda g, u, d: swiglus.append(in_backward()) or real_swiglu(g, u, d)
    )
    assert_matches_reference(ref, model, packed_batch())
    assert swiglus == [False, False]  # one a layer, in the forward
    layers = model.get_base_model().model.layers
    down, o = (
        {id(layer.get_submodule(part).base_layer.weight) for layer in layers}
        for part in ("mlp.down_proj", "self_attn.o_proj")
    )
    forward, recomputed = ([w for inside, w in base_gemms if inside is phase] for phase in (False, True))
    assert sorted(forward) == sorted(down | o)
    assert sorted(recomputed) == sorted(o)  # the recompute ran, without the down projection


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_training_steps_follow_the_reference(fused):
    """Four AdamW steps: the patched model's loss curve is the reference's. Fused AdamW writes the
    weights without bumping their version: the adapter copies must still be refreshed each step."""
    reference = loss_curve(tiny(LlamaConfig), fused)
    model = tiny(LlamaConfig)
    apply_kernels(model, training_config(use_kernels=True))
    assert reference[-1] < reference[0]
    torch.testing.assert_close(torch.tensor(loss_curve(model, fused)), torch.tensor(reference), rtol=1e-4, atol=1e-5)


def loss_curve(model, fused: bool, steps: int = 4, batch: dict | None = None) -> list[float]:
    """The losses of `steps` AdamW steps on one batch: `batch`, else one packed batch (the same for every model)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    if batch is None:
        torch.manual_seed(1)
        batch = packed_batch()
    curve = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    return curve


def test_logits_and_generation_use_the_original_forward():
    """Without labels (logits wanted) and with a KV cache (generation) the original forward runs; an eval forward
    with labels takes the fused loss (tests/kernels/test_target_rows.py)."""
    model = tiny(LlamaConfig)
    apply_kernels(model, training_config(use_kernels=True))
    model.eval()
    batch = packed_batch()
    del batch["use_cache"], batch["labels"]
    with torch.no_grad():
        out = model(**batch)
        generated = model.generate(input_ids=batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.logits.shape == (2, 10, VOCAB)
    assert generated.shape == (1, 7)


def test_switches():
    if DEVICE == "cpu":  # use_kernels unset: off on CPU
        assert apply_kernels(tiny(LlamaConfig), training_config()) == []
    assert apply_kernels(tiny(LlamaConfig), training_config(use_kernels=False)) == []
    no_mlp = apply_kernels(
        tiny(LlamaConfig), training_config(use_kernels=True, lora_mlp_kernel=False, lora_o_kernel=False)
    )
    assert "swiglu" in no_mlp and "lora_mlp" not in no_mlp and "lora_o" not in no_mlp and "lora_qkv" in no_mlp
    # DoRA is not modelled by the fused LoRA functions: only the non-LoRA kernels apply
    with_dora = apply_kernels(tiny(LlamaConfig, use_dora=True), training_config(use_kernels=True, peft_use_dora=True))
    assert with_dora == ["rmsnorm", "swiglu", "rope", "residual_fold", "fused_linear_cross_entropy"]


def test_unknown_family_and_unverified_transformers(monkeypatch, caplog):
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)).to(DEVICE)
    assert apply_kernels(gpt2, training_config(use_kernels=True)) == []
    monkeypatch.setattr(registry, "VERIFIED_TRANSFORMERS", ("4.0",))
    with caplog.at_level(logging.WARNING, logger="ftw.kernels"):
        assert apply_kernels(tiny(LlamaConfig), training_config(use_kernels=True)) == []
    assert "not one the patches were verified against" in caplog.text


def test_patches_stay_on_the_instance():
    """Another model of the same family in the process keeps the stock forwards."""
    patched, other = tiny(LlamaConfig), tiny(LlamaConfig)
    apply_kernels(patched, training_config(use_kernels=True))
    attn = other.get_base_model().model.layers[0].self_attn
    assert "forward" not in vars(attn) and "forward" in vars(patched.get_base_model().model.layers[0].self_attn)


def test_segment_starts_split_samples_and_padding():
    from ftw_kernels.attention import segment_starts

    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    cu, longest = segment_starts(pos, mask, 2, 6, pos.device)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and cu.dtype == torch.int32 and longest == 4
    cu, longest = segment_starts(None, None, 2, 6, pos.device)
    assert cu.tolist() == [0, 6, 12] and longest == 6


def test_a_padded_rows_padding_is_one_segment():
    """Padded micro-batches (no packing) as the trainer collates them, their padding at position 0: each row's
    samples keep their segments and its padding is one more, not one a pad token (6,629 segments for the 8 rows
    of the 1B bench's padded micro-batch, which ran 0.34× Unsloth's padded rows on an H100)."""
    from ftw_kernels.attention import host_segments
    from worker.train.batches import collate

    rows = [
        {"input_ids": [5] * n, "labels": [6] * n, "position_ids": list(range(a)) + list(range(n - a))}
        for n, a in ((5, 5), (4, 2), (2, 2))
    ]
    batch = collate(rows, pad_id=0, packed=False)
    found = host_segments(batch["position_ids"], batch["attention_mask"])
    # row 0: one sample; row 1: two samples, then one pad; row 2: one sample, then three pads as one segment
    assert found["cu_seq_lens_q"].tolist() == [0, 5, 7, 9, 10, 12, 15] and found["max_length_q"] == 5
    left = host_segments(torch.tensor([[0, 0, 0, 1, 2]]), torch.tensor([[0, 0, 1, 1, 1]]))  # left-padded prompts
    assert left["cu_seq_lens_q"].tolist() == [0, 2, 5]


def test_varlen_attention_with_a_kv_cache_attends_to_the_past_only():
    """Generation hands the attention a query shorter than the keys: the new tokens see every
    cached key before them and their own, none after, none padded."""
    from ftw_kernels.attention import varlen_attention_forward

    q = torch.randn(2, 4, 2, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # row 1 left-padded
    out, _ = varlen_attention_forward(torch.nn.Module(), q, k, v, mask, scaling=8**-0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for row in range(2):
        for i, pos in enumerate((3, 4)):
            keys = [j for j in range(pos + 1) if mask[row, j]]
            w = torch.softmax(torch.einsum("hd,hkd->hk", q[row, :, i], kk[row, :, keys]) * 8**-0.5, -1)
            ref = torch.einsum("hk,hkd->hd", w, vv[row, :, keys])
            torch.testing.assert_close(out[row, i], ref, rtol=1e-5, atol=1e-5)


def test_the_recompute_check_leaves_a_compiled_graph_whole():
    """Under torch.compile the compiler partitions the recompute itself; reading autograd's state there would break
    the graph (an error with fullgraph) in every checkpointed layer."""

    class Layer(torch.nn.Module):
        gradient_checkpointing = True

        def forward(self, x):
            return x * 2 if patches._checkpoint_pass(self) else x + 1

    x = torch.ones(3, requires_grad=True)
    assert torch.equal(torch.compile(Layer().train(), fullgraph=True, backend="eager")(x), x + 1)

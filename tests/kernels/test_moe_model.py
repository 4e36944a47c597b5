"""A tiny Qwen3-MoE with LoRA on attention, router and experts (PEFT target_parameters): ftw's
experts kernel, installed through the kernel registry, against PEFT + transformers' own path."""

from __future__ import annotations

import copy

import pytest
import torch

from schemas.validate import validate_config
from tests.conftest import randomise_lora_b
from tests.kernels.conftest import rel_err


def tiny_moe(device: str = "cpu", dtype: torch.dtype | None = None, **shape):
    """A random Qwen3-MoE of a tiny shape (`shape` overrides its config's sizes)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    sizes = {
        "vocab_size": 128,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "moe_intermediate_size": 32,
        "intermediate_size": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        **shape,
    }
    with torch.device(device):
        return AutoModelForCausalLM.from_config(Qwen3MoeConfig(**sizes, tie_word_embeddings=False), dtype=dtype)


def config(**extra):
    raw = {
        "base_model": "org/tiny-moe",
        "learning_rate": 1e-3,
        "datasets": [{"path": "org/d", "type": "alpaca"}],
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj", "gate"],
        "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "use_kernels": True,
        **extra,
    }
    report = validate_config(raw, {"BASE_VOLUME": "/tmp"})
    assert report.valid, report.errors
    return report.value


def lora_model(cfg, **model):
    """`tiny_moe(**model)` with the config's adapter, its LoRA B's random (a live LoRA term)."""
    from worker.train.adapters import attach

    model = attach(tiny_moe(**model), cfg)
    torch.manual_seed(1)
    randomise_lora_b(model, std=0.2)
    return model


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# fp32 on CPU: no varlen attention; q, k, v bordered (the experts are not a gate, up pair)
DENSE = ["rmsnorm", "rope", "lora_qkv", "lora_o", "fused_linear_cross_entropy", "bordered_qkv"]


def packed_batch(tokens: int = 10):
    """Two samples packed in one row (position ids restart), the first label masked."""
    ids = torch.randint(0, 128, (1, tokens))
    labels = ids.clone()
    labels[0, 0] = -100
    pos = torch.tensor([list(range(4)) + list(range(tokens - 4))])
    return dict(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)


def loss_aux_grads(model, batch):
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), out.aux_loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("gemm", ["triton", "grouped_mm"])
def test_patched_moe_model_matches_peft_and_never_forms_w_plus_ba(gemm, monkeypatch):
    """Every kernel on a Qwen3-MoE (experts, norms, rope, fused attention LoRA, fused loss with the
    router's aux loss) against PEFT + transformers: the loss, the aux loss and every adapter
    gradient, router included, on a packed row; the experts run on the frozen W and the factors."""
    from ftw_kernels import apply_kernels
    from worker.train.moe import configure_router_loss

    monkeypatch.setenv("FTW_MOE_GEMM", gemm)
    cfg = config(lora_target_modules=[*ATTENTION, "gate"], output_router_logits=True, router_aux_loss_coef=0.5)
    reference = lora_model(cfg)
    ours = copy.deepcopy(reference)
    assert apply_kernels(ours, cfg) == [{"triton": "scattermoe_lora", "grouped_mm": "grouped_mm_lora"}[gemm], *DENSE]
    parametrized = []
    for m in ours.modules():
        if type(m).__name__ == "Qwen3MoeExperts":
            m.register_forward_pre_hook(
                lambda mod, args: parametrized.append(torch.nn.utils.parametrize.is_parametrized(mod))
            )
    for model in (reference, ours):
        assert configure_router_loss(model, cfg, micro_per_step=1)
    batch = packed_batch()
    ref_loss, ref_aux, ref_grads = loss_aux_grads(reference, batch)
    loss, aux, grads = loss_aux_grads(ours, batch)
    assert parametrized == [False, False]  # both layers ran the kernel, on the frozen W and the factors
    assert aux is not None and rel_err(aux, ref_aux) < 1e-6
    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("experts" in n for n in grads) and any("gate" in n for n in grads)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


def test_disabled_adapters_fall_back_to_the_base_experts():
    from ftw_kernels import apply_kernels

    cfg = config()
    model = lora_model(cfg)
    apply_kernels(model, cfg)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad(), model.disable_adapter():
        without = model(input_ids=ids).logits
    with torch.no_grad():
        with_lora = model(input_ids=ids).logits
    plain = tiny_moe()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    assert rel_err(without, expected) < 1e-5
    assert rel_err(with_lora, expected) > 1e-3


def test_adapter_saves_in_peft_format_and_reloads(tmp_path):
    from peft import PeftModel

    cfg = config()
    model = lora_model(cfg)
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "adapter_config.json").read_text()
    assert '"target_parameters"' in saved and "gate_up_proj" in saved
    reloaded = PeftModel.from_pretrained(tiny_moe(), tmp_path)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert rel_err(reloaded(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-6


@pytest.mark.parametrize("micro_per_step", [1, 4])
def test_router_aux_loss_is_added_once_per_step(micro_per_step):
    from worker.train.moe import configure_router_loss

    cfg = config(output_router_logits=True, router_aux_loss_coef=0.5)
    model = lora_model(cfg)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss
        assert configure_router_loss(model, cfg, micro_per_step)
        out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, plain + 0.5 / micro_per_step * out.aux_loss)


@pytest.mark.parametrize(
    "family, router, applied",
    [
        ("olmoe", "gate", ["scattermoe_lora", *DENSE]),
        ("mixtral", "gate", ["scattermoe_lora", *DENSE]),
        ("gpt_oss", "router", []),
    ],
)
def test_other_moe_families_train_expert_lora_fused_where_the_layout_allows(family, router, applied):
    """OLMoE (q/k norms over the whole projections, clipped q/k/v) and Mixtral share Qwen3-MoE's
    experts layout and get every kernel; GPT-OSS's biased, transposed experts with their clamped
    gate run transformers' grouped_mm under PEFT, with the same LoRA targets."""
    from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, OlmoeConfig

    from ftw_kernels import apply_kernels
    from worker.train.adapters import attach

    common = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        intermediate_size=32,
        num_experts_per_tok=2,
    )
    model_config = {
        "olmoe": lambda: OlmoeConfig(**{**common, "num_key_value_heads": 2}, num_experts=8, clip_qkv=0.2),
        "mixtral": lambda: MixtralConfig(**common, head_dim=32, num_local_experts=8),
        "gpt_oss": lambda: GptOssConfig(**common, head_dim=32, num_local_experts=8),
    }[family]()
    cfg = config(lora_target_modules=[*ATTENTION, router])
    torch.manual_seed(0)
    reference = attach(AutoModelForCausalLM.from_config(model_config), cfg)
    randomise_lora_b(reference, std=0.2)
    ours = copy.deepcopy(reference)
    assert apply_kernels(ours, cfg) == applied
    batch = packed_batch(9)
    ref_loss, _, ref_grads = loss_aux_grads(reference, batch)
    loss, _, grads = loss_aux_grads(ours, batch)
    assert rel_err(loss, ref_loss) < 1e-5
    assert any("experts" in n for n in grads) and any(f"{router}." in n for n in grads)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


def test_use_scattermoe_on_a_dense_model_patches_nothing_when_kernels_are_off_here():
    """use_scattermoe asks for the experts kernel only: on CPU (use_kernels unset) a dense model keeps
    its own forwards instead of getting the dense Triton patches."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftw_kernels import apply_kernels

    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    cfg = config(use_kernels=None, use_scattermoe=True, lora_target_parameters=None, lora_target_modules=["q_proj"])
    assert apply_kernels(dense, cfg) == []
    assert not any(hasattr(m, "_ftw_original_forward") for m in dense.modules())

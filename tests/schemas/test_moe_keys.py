"""MoE keys of axolotl configs: LoRA on expert parameters, the experts kernel, the router loss."""

from __future__ import annotations

import pytest

from schemas.validate import validate_config

ENV = {"BASE_VOLUME": "/volume"}
# the shape of axolotl's Qwen3-MoE / OLMoE ScatterMoE LoRA configs
MOE = {
    "base_model": "Qwen/Qwen3-30B-A3B",
    "learning_rate": 2e-4,
    "datasets": [{"path": "org/data", "type": "alpaca"}],
    "plugins": ["axolotl.integrations.kernels.KernelsPlugin"],
    "use_kernels": True,
    "use_scattermoe": True,
    "experts_implementation": "scattermoe",
    "adapter": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate"],
    "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "output_router_logits": True,
    "router_aux_loss_coef": 0.001,
    "sample_packing": True,
}


def test_a_scattermoe_lora_config_validates_and_keeps_its_keys():
    report = validate_config(MOE, ENV)
    assert report.valid, report.errors
    cfg = report.value
    assert cfg.lora_target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert (cfg.use_scattermoe, cfg.experts_implementation, cfg.output_router_logits, cfg.router_aux_loss_coef) == (
        True,
        "scattermoe",
        True,
        0.001,
    )
    assert any(w.loc == "plugins" and "KernelsPlugin" in w.msg for w in report.warnings)


@pytest.mark.parametrize(
    "extra, loc, fragment",
    [
        ({"adapter": None}, "lora_target_parameters", "needs adapter"),
        ({"lora_dropout": 0.05}, "lora_dropout", "lora_dropout: 0"),
        ({"peft_use_dora": True}, "peft_use_dora", "does not work with LoRA on parameters"),
        ({"experts_implementation": "grouped_mm"}, "use_scattermoe", "keep one"),
        ({"use_kernels": False}, "use_kernels", "keep one"),
        ({"experts_implementation": "sonicmoe", "use_scattermoe": None}, "experts_implementation", "not supported"),
        ({"experts_implementation": "grouped", "use_scattermoe": None}, "experts_implementation", "not known"),
        ({"output_router_logits": None}, "router_aux_loss_coef", "output_router_logits: true"),
        ({"router_aux_loss_coef": -1}, "router_aux_loss_coef", "greater than or equal"),
        (
            {"quantize_moe_experts": True, "adapter": "qlora", "load_in_4bit": True},
            "quantize_moe_experts",
            "not supported",
        ),
        ({"plugins": ["axolotl.integrations.kernels.KernelsPlugin", "my.Plugin"]}, "plugins", "refused"),
    ],
)
def test_moe_rules_name_the_key_to_change(extra, loc, fragment):
    report = validate_config({**MOE, **extra}, ENV)
    assert not report.valid
    assert any(i.loc == loc and fragment in i.msg for i in report.errors), report.errors


def test_qlora_moe_without_expert_quantisation_validates():
    assert validate_config({**MOE, "adapter": "qlora", "load_in_4bit": True, "quantize_moe_experts": False}, ENV).valid

"""The publish-time vLLM check names LoRA on MoE experts and routers plainly (what serves it, what to do)."""

from __future__ import annotations

import json

from worker.publish.vllm_check import check_adapter


def adapter(tmp_path, **config):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 16, "target_modules": ["q_proj"], **config})
    )
    return tmp_path


def test_expert_lora_says_vllm_cpu_cannot_serve_it_and_what_can(tmp_path):
    warnings = check_adapter(adapter(tmp_path, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    assert len(warnings) == 1
    assert "vLLM on CPU cannot load it" in warnings[0] and "FTW_SERVE_ENGINE=transformers" in warnings[0]
    assert "mlp.experts.gate_up_proj" in warnings[0]


def test_router_lora_is_named_apart(tmp_path):
    warnings = check_adapter(adapter(tmp_path, target_parameters=["gate.weight"]))
    assert warnings and "gate.weight" in warnings[0] and "router" in warnings[0]


def test_plain_adapter_has_no_moe_warning(tmp_path):
    assert check_adapter(adapter(tmp_path)) == []

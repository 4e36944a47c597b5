"""Training-config validation: cross-field rules, every error at once, no mutation, exact round trips."""

from __future__ import annotations

import copy

import pytest

from schemas.config import TrainingConfig
from schemas.validate import validate_config
from tests.schemas.configs import ENV, GOOD, errors, locs

LORA = {**GOOD, "adapter": "lora"}


def test_good_config_has_axolotl_defaults():
    report = validate_config(GOOD, ENV)
    assert report.valid and report.warnings == []
    cfg = report.value
    assert (cfg.sequence_len, cfg.num_epochs, cfg.optimizer, cfg.lr_scheduler) == (
        512,
        1.0,
        "adamw_torch_fused",
        "cosine",
    )
    assert (cfg.bf16, cfg.tf32, cfg.lora_dropout, cfg.save_total_limit, cfg.batch_shape()) == (
        "auto",
        "auto",
        0.0,
        4,
        (1, 1),
    )


def test_every_error_at_once_field_errors_and_cross_field_rules():
    bad = {
        **GOOD,
        "learning_rate": "fast",
        "adapter": "qlora",
        "warmup_steps": 10,
        "warmup_ratio": 0.1,
        "micro_batch_size": 0,
        "batch_size": 8,
        "lora_rr": 4,
    }
    found = locs(bad)
    assert {"learning_rate", "adapter", "warmup_steps", "micro_batch_size"} <= found
    # batch rules read micro_batch_size, which is broken: they must not fire on a stand-in
    assert "batch_size" not in found
    report = validate_config(bad, ENV)
    assert report.value is None
    assert any("did you mean 'lora_r'" in w.msg for w in report.warnings)


def test_missing_required_keys_still_get_rules_checked():
    found = locs({"adapter": "qlora", "datasets": [{"path": "org/data"}]})
    assert {"base_model", "learning_rate", "adapter"} <= found


def test_broken_datasets_do_not_also_claim_datasets_are_missing():
    report = validate_config({**GOOD, "datasets": "org/data"}, ENV)
    assert [i.loc for i in report.errors] == ["datasets"]
    assert "list" in report.errors[0].msg


@pytest.mark.parametrize(
    "extra, loc, fragment",
    [
        ({"adapter": "qlora"}, "adapter", "load_in_4bit: true"),
        ({"load_in_8bit": True}, "load_in_8bit", "needs an adapter"),
        ({"adapter": "lora", "load_in_4bit": True}, "load_in_4bit", "adapter: qlora"),
        ({"adapter": "qlora", "load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit", "exclusive"),
        ({"gradient_accumulation_steps": 2, "batch_size": 8}, "batch_size", "exclusive"),
        ({"batch_size": 8}, "batch_size", "add micro_batch_size"),
        ({"micro_batch_size": 3, "batch_size": 8}, "batch_size", "not a multiple"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, "warmup_steps", "exclusive"),
        ({"warmup_steps": 2.5}, "warmup_steps", "fraction below 1"),
        ({"save_steps": 5, "saves_per_epoch": 2}, "save_steps", "exclusive"),
        ({"eval_steps": 5, "evals_per_epoch": 2}, "eval_steps", "exclusive"),
        ({"fsdp": ["full_shard"], "deepspeed": "zero2"}, "fsdp", "exclusive"),
        ({"bf16": True, "fp16": True}, "bf16", "exclusive"),
        ({"merge_lora": True}, "merge_lora", "needs an adapter"),
        ({"lora_model_dir": "org/adapter"}, "lora_model_dir", "adapter"),
        ({"val_set_size": 1.5}, "val_set_size", "fraction"),
        ({"optimizer": "adamw_torchh"}, "optimizer", "not known"),
        ({"lr_scheduler": "cosin"}, "lr_scheduler", "not known"),
        ({"deepspeed": "/etc/ds.json"}, "deepspeed", "not read from a job"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}},
            "deepspeed.optimizer",
            "learning_rate",
        ),
        ({"deepspeed": {"scheduler": {"type": "WarmupLR"}}}, "deepspeed.scheduler", "lr_scheduler"),
        ({"deepspeed_as_fsdp": True}, "deepspeed_as_fsdp", "no deepspeed key"),
        ({"datasets": []}, "datasets", "required"),
        ({"chat_template_jinja": "templates/llama.jinja"}, "chat_template_jinja", "not a file path"),
        (
            {"datasets": [{"path": "org/d", "type": "chat_template", "chat_template_jinja": "/etc/t.j2"}]},
            "datasets[0].chat_template_jinja",
            "not a file path",
        ),
    ],
)
def test_cross_field_rules(extra, loc, fragment):
    report = validate_config({**GOOD, **extra}, ENV)
    assert not report.valid
    assert any(i.loc == loc and fragment in i.msg for i in report.errors), report.errors


@pytest.mark.parametrize(
    "extra, shape",
    [
        ({}, (1, 1)),
        ({"micro_batch_size": 4}, (4, 1)),
        ({"micro_batch_size": 2, "gradient_accumulation_steps": 8}, (2, 8)),
        ({"micro_batch_size": 2, "batch_size": 16}, (2, 8)),
        ({"gradient_accumulation_steps": 4}, (1, 4)),
    ],
)
def test_batch_shape(extra, shape):
    report = validate_config({**GOOD, **extra}, ENV)
    assert report.valid, report.errors
    assert report.value.batch_shape() == shape


def test_validation_does_not_mutate_its_input():
    raw = {
        **GOOD,
        "flash_attention": True,
        "model_type": "AutoModelForCausalLM",
        "lora_r": None,
        "tf32": None,
        "deepspeed": "deepspeed_configs/zero3_bf16.json",
        "datasets": [{"path": "org/data", "type": "alpaca", "split": None}],
    }
    before = copy.deepcopy(raw)
    report = validate_config(raw, ENV)
    assert raw == before
    cfg = report.value
    assert report.valid, report.errors
    assert (cfg.attn_implementation, cfg.type_of_model, cfg.lora_r, cfg.tf32, cfg.deepspeed) == (
        "flash_attention_2",
        "AutoModelForCausalLM",
        8,
        False,
        "zero3",
    )
    assert cfg.datasets[0].split == "train"


def test_a_config_written_back_in_full_validates_again():
    """A run's config.json is the validated config dumped with every key (defaults included): the
    stage children validate it again, so a key at its default is no method's option."""
    report = validate_config({**GOOD, "adapter": "lora"}, ENV)
    again = validate_config(report.value.model_dump(mode="json"), ENV)
    assert again.valid, again.errors


@pytest.mark.parametrize("raw", [None, [], "base_model: x", 3])
def test_not_a_mapping_is_a_whole_document_error(raw):
    report = validate_config(raw, ENV)
    assert len(report.errors) == 1 and report.errors[0].loc == "" and "mapping" in report.errors[0].msg


@pytest.mark.parametrize("key", ["num_epochs", "learning_rate", "weight_decay", "val_set_size"])
def test_infinity_and_nan_are_rejected(key):
    for bad in (float("inf"), float("nan")):
        assert key in locs({**GOOD, key: bad})


def test_config_json_round_trip_is_exact():
    """The stage children load RUN_DIR/config.json with model_validate_json (docs/contracts.md)."""
    raw = {
        **GOOD,
        "adapter": "qlora",
        "load_in_4bit": True,
        "warmup_steps": 0.1,
        "fsdp_config": {"fsdp_version": 2, "offload_params": True},
        "special_tokens": {"pad_token": "<pad>"},
        "optim_args": {"betas": [0.9, 0.95]},
        "datasets": [
            {"path": "org/d", "type": {"field_instruction": "q", "field_output": "a"}},
            {
                "path": "org/c",
                "type": "chat_template",
                "message_property_mappings": {"role": "from", "content": "value", "weight": "w"},
            },
        ],
    }
    cfg = validate_config(raw, ENV).value
    assert cfg is not None
    assert TrainingConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_torch_compile_backend_and_mode_are_checked_before_any_work():
    """torch would raise these only after the model is loaded, with no hint."""
    assert {"torch_compile_backend", "torch_compile_mode"} <= locs(
        {**GOOD, "torch_compile": True, "torch_compile_backend": "nope", "torch_compile_mode": "fastest"}
    )
    assert not errors(
        {**GOOD, "torch_compile": True, "torch_compile_backend": "inductor", "torch_compile_mode": "max-autotune"}
    )


@pytest.mark.parametrize(
    "extra, says",
    [
        ({}, "not full fine-tuning"),
        ({"adapter": "lora", "load_in_8bit": True}, "not an 8-bit base"),
        ({"adapter": "lora", "peft_use_dora": True}, "peft_use_dora"),
        ({"adapter": "lora", "use_kernels": False}, "remove use_kernels"),
        ({"adapter": "lora", "fp16": True, "bf16": False}, "set bf16: true"),
        ({"adapter": "lora", "bf16": False}, "set bf16: true"),
        ({"adapter": "lora", "torch_compile": True}, "torch_compile"),
        ({"adapter": "lora", "torch_compile": "auto"}, "torch_compile"),
        ({"adapter": "lora", "fsdp_config": {"fsdp_version": 2}}, "no fsdp/deepspeed"),
        ({"adapter": "lora", "deepspeed": "zero2"}, "no fsdp/deepspeed"),
    ],
)
def test_fp8_base_weights_is_refused_where_it_cannot_run(extra, says):
    found = errors({**GOOD, "fp8_base_weights": True, **extra})
    assert says in found.get(("fp8_base_weights", "invalid"), ""), found
    assert "remove fp8_base_weights" in found[("fp8_base_weights", "invalid")]


def test_fp8_base_weights_with_lora_is_valid_and_axolotl_fp8_points_to_it():
    report = validate_config({**GOOD, "adapter": "lora", "fp8_base_weights": True}, ENV)
    assert report.valid and report.value.fp8_base_weights is True
    qlora = validate_config({**GOOD, "adapter": "qlora", "load_in_4bit": True, "fp8_base_weights": True}, ENV)
    assert qlora.valid and qlora.value.fp8_base_weights is True  # 4-bit storage, float8 matmuls
    found = errors({**GOOD, "adapter": "lora", "fp8": True})
    assert "torchao" in found[("fp8", "unsupported")] and "fp8_base_weights: true" in found[("fp8", "unsupported")]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"peft_use_dora": True}, "peft_use_dora"),
        ({"lora_bias": "all"}, "lora_bias"),
    ],
)
def test_a_lora_off_the_fused_kernels_is_valid_with_a_warning_that_names_the_key(changes, key):
    """DoRA and a trained bias are not modelled by the fused LoRA kernels (the registry reads the same
    TrainingConfig.lora_unfused_by): the run is right, so it is a warning, and it says what to set."""
    report = validate_config({**LORA, **changes}, ENV)
    assert report.valid
    assert [w.loc for w in report.warnings] == [key]
    assert "fused LoRA kernels" in report.warnings[0].msg and "slower" in report.warnings[0].msg
    assert validate_config({**LORA, **changes, "use_kernels": False}, ENV).warnings == []  # nothing to lose
    assert validate_config(LORA, ENV).warnings == []


def test_an_8bit_base_keeps_the_fused_kernels_and_gets_no_warning():
    """load_in_8bit (17 of axolotl's examples): the fused LoRA kernels dequantise its int8 weights per matmul."""
    assert validate_config({**LORA, "load_in_8bit": True}, ENV).warnings == []


def test_lora_dropout_keeps_the_fused_kernels_and_gets_no_warning():
    """axolotl's examples mostly set lora_dropout: 0.05; the fused LoRA kernels take it (kernels/ftw_kernels/
    lora_dropout.py)."""
    assert validate_config({**LORA, "lora_dropout": 0.1}, ENV).warnings == []
    (warning,) = validate_config({**LORA, "lora_dropout": 0.1, "peft_use_dora": True}, ENV).warnings
    assert warning.msg.startswith("peft_use_dora: true keeps") and "DoRA has no fused kernel" in warning.msg
    assert validate_config({**GOOD, "peft_use_dora": True}, ENV).warnings == []  # full fine-tuning: no LoRA to fuse

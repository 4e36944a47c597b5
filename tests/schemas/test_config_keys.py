"""Training-config key classes: unsupported, gated, no-effect, unknown and renamed keys, dataset types."""

from __future__ import annotations

import pytest

from schemas.classify import ALL_KNOWN
from schemas.config import TrainingConfig
from schemas.datasets import DatasetConfig
from schemas.keys import ALIASES, DATASET_UNSUPPORTED, GATED, NO_EFFECT, UNSUPPORTED, UNSUPPORTED_PREFIXES
from schemas.validate import validate_config
from tests.schemas.configs import ENV, GOOD, errors, locs


def test_registries_are_disjoint_and_do_not_shadow_typed_fields():
    typed = set(TrainingConfig.model_fields)
    groups = {
        "aliases": set(ALIASES),
        "no_effect": set(NO_EFFECT),
        "unsupported": set(UNSUPPORTED),
        "gated": set(GATED),
    }
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], (a, b, groups[a] & groups[b])
    # a typed field may be gated (trust_remote_code), never unsupported, no-effect or an alias
    assert (typed & (set(NO_EFFECT) | set(ALIASES))) == set()
    assert typed & set(UNSUPPORTED) == set()
    # typed fields under an unsupported prefix (dpo_loss_type under dpo_) are read as typed: classified first
    shadowed = [f for f in typed if f.startswith(tuple(UNSUPPORTED_PREFIXES))]
    assert shadowed and all(
        validate_config(
            {
                **GOOD,
                "datasets": [{"path": "org/p", "type": "chatml.intel"}],
                "adapter": "lora",
                "rl": "kto" if f.startswith("kto") else "dpo",
                f: 0.1 if "weight" in f or "smoothing" in f else ["ipo"],
            },
            ENV,
        ).valid
        for f in shadowed
    )
    assert not set(DATASET_UNSUPPORTED) & (set(DatasetConfig.model_fields) - {"trust_remote_code"})


@pytest.mark.parametrize("key, value", [("qat", {"x": 1}), ("swanlab_project", "p"), ("peft", {"loftq_config": {}})])
def test_unsupported_keys_are_named(key, value):
    report = validate_config({**GOOD, key: value}, ENV)
    assert [(i.loc, i.kind) for i in report.errors] == [(key, "unsupported")]
    assert key in report.errors[0].msg and "not supported" in report.errors[0].msg


def test_unsupported_keys_set_off_are_harmless():
    assert validate_config({**GOOD, "tiled_mlp": False, "qat": None, "unfrozen_parameters": []}, ENV).valid


def test_unknown_keys_warn_with_the_closest_key_and_never_block():
    report = validate_config(
        {**GOOD, "learnin_rate": 1, "datasets": [{"path": "org/data", "type": "alpaca", "feild": "x"}]}, ENV
    )
    assert report.valid
    msgs = {w.loc: w.msg for w in report.warnings}
    assert "did you mean 'learning_rate'" in msgs["learnin_rate"]
    assert "did you mean 'field'" in msgs["datasets[0].feild"]


@pytest.mark.parametrize(
    "key, runs",
    [
        ("liger_rms_norm", "fused RMSNorm"),
        ("flash_attn_rms_norm", "fused RMSNorm"),
        ("liger_rope", "fused rotary embedding"),
        ("liger_glu_activation", "fused SwiGLU"),
        ("liger_fused_linear_cross_entropy", "fused linear cross-entropy"),
        ("cut_cross_entropy", "fused linear cross-entropy"),
        ("liger_layer_norm", "no fused LayerNorm"),
        ("liger_rms_norm_gated", "no fused gated RMSNorm"),
    ],
)
def test_other_projects_kernel_switches_are_accepted_and_say_what_runs(key, runs):
    on = validate_config({**GOOD, key: True}, ENV)
    assert on.valid and [w.loc for w in on.warnings] == [key]
    assert runs in on.warnings[0].msg and "is not loaded" in on.warnings[0].msg
    off = validate_config({**GOOD, key: False}, ENV)
    assert off.valid and not off.warnings  # set off: nothing to say


def test_the_liger_plugin_is_not_loaded_and_does_not_need_the_operator():
    plugins = ["axolotl.integrations.liger.LigerPlugin", "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]
    report = validate_config({**GOOD, "plugins": plugins, "liger_rope": True, "liger_rms_norm": True}, ENV)
    assert report.valid, report.errors
    assert sum(w.loc == "plugins" for w in report.warnings) == 2
    assert all("not loaded" in w.msg for w in report.warnings)
    # with a plugin that imports code, the list is gated as a whole
    gated = validate_config({**GOOD, "plugins": [*plugins, "my_company.Plugin"]}, ENV)
    assert [(i.loc, i.kind) for i in gated.errors] == [("plugins", "gated")]


def test_no_effect_keys_warn():
    report = validate_config({**GOOD, "strict": True, "output_dir": "./out"}, ENV)
    assert report.valid
    assert {w.loc for w in report.warnings} == {"strict", "output_dir"}


@pytest.mark.parametrize(
    "key, value, var",
    [
        ("plugins", ["axolotl.integrations.swanlab.SwanLabPlugin"], "FTW_ALLOW_PLUGINS"),
        ("trust_remote_code", True, "FTW_ALLOW_REMOTE_CODE"),
        ("torchdistx_path", "/opt/x", "FTW_ALLOW_PLUGINS"),
        ("trainer_cls", "my.Trainer", "FTW_ALLOW_PLUGINS"),
    ],
)
def test_gated_keys_need_the_operator(key, value, var):
    report = validate_config({**GOOD, key: value}, ENV)
    assert [(i.loc, i.kind) for i in report.errors] == [(key, "gated")]
    assert f"{var}=1" in report.errors[0].msg
    allowed = validate_config({**GOOD, key: value}, {**ENV, var: "1"})
    if key == "trust_remote_code":
        assert allowed.valid and allowed.value.trust_remote_code is True
    else:  # allowed, but ftw has no plugin loader: named as unsupported, never silently ignored
        assert [(i.loc, i.kind) for i in allowed.errors] == [(key, "unsupported")]


@pytest.mark.parametrize(
    "kind, expected_kind, fragment",
    [
        ("sharegpt", "unsupported", "chat_template"),
        ("sharegpt:chat", "unsupported", "chat_template"),
        ("orpo.chat_template", "unsupported", "not supported"),
        ("my_pkg.my_strategy", "gated", "FTW_ALLOW_PLUGINS=1"),
        ("alpacaa", "invalid", "not a known prompt strategy; did you mean 'alpaca'?"),
        ("pretrain", "invalid", "pretraining_dataset"),
        ("ebft_opencode.transform", "invalid", "set rl: ebft"),
    ],
)
def test_dataset_types(kind, expected_kind, fragment):
    report = validate_config({**GOOD, "datasets": [{"path": "org/data", "type": kind}]}, ENV)
    assert [(i.loc, i.kind) for i in report.errors] == [("datasets[0].type", expected_kind)]
    assert fragment in report.errors[0].msg


def test_dataset_type_dict_form_and_chat_template_keys():
    ds = [
        {"path": "org/data", "type": {"field_instruction": "q", "field_output": "a", "format": "{instruction}"}},
        {
            "path": "org/chat",
            "type": "chat_template",
            "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
            "roles_to_train": ["gpt"],
            "train_on_eos": "turn",
        },
    ]
    report = validate_config({**GOOD, "datasets": ds}, ENV)
    assert report.valid, report.errors
    assert report.value.datasets[0].strategy_name() == "user_defined"
    assert report.value.datasets[1].role_key() == "from"


def test_legacy_attention_flags():
    assert validate_config({**GOOD, "sdp_attention": True}, ENV).value.attn_implementation == "sdpa"
    assert locs({**GOOD, "flash_attention": True, "attn_implementation": "sdpa"}) == {"flash_attention"}
    assert errors({**GOOD, "xformers_attention": True}).keys() == {("xformers_attention", "unsupported")}


def test_known_but_unshipped_optimizer_is_unsupported_not_a_typo():
    assert errors({**GOOD, "optimizer": "galore_adamw"}).keys() == {("optimizer", "unsupported")}
    assert errors({**GOOD, "optimizer": "adamw_torchh"}).keys() == {("optimizer", "invalid")}


def test_every_key_name_known_to_the_suggester():
    assert {"learning_rate", "liger_rope", "plugins", "flash_attention", "model_type", "strict"} <= ALL_KNOWN


@pytest.mark.parametrize(
    "extra, attr, value",
    [
        ({"torch_dtype": "bfloat16"}, "bf16", True),
        ({"torch_dtype": "float16", "bf16": False}, "fp16", True),
        ({"torch_dtype": "bfloat16", "bf16": False}, "bf16", False),  # the explicit key wins
        ({"model_config": {"rope_theta": 1e6}}, "overrides_of_model_config", {"rope_theta": 1e6}),
        ({"evaluation_strategy": "steps"}, "eval_strategy", "steps"),
        ({"warmup_steps": 0.1}, "warmup_steps", 0.1),
        ({"evals_per_epoch": 0}, "evals_per_epoch", 0),
    ],
)
def test_axolotl_spellings_map_onto_current_keys(extra, attr, value):
    report = validate_config({**GOOD, **extra}, ENV)
    assert report.valid, report.errors
    assert getattr(report.value, attr) == value


def test_alias_and_its_target_both_set_warns_and_the_target_wins():
    report = validate_config({**GOOD, "model_type": "A", "type_of_model": "B"}, ENV)
    assert report.value.type_of_model == "B"
    assert [w.loc for w in report.warnings] == ["model_type"]


def test_unknown_torch_dtype_is_an_error():
    assert locs({**GOOD, "torch_dtype": "int4"}) == {"torch_dtype"}


def test_own_deepspeed_file_is_not_mistaken_for_a_bundled_one():
    assert validate_config({**GOOD, "deepspeed": "deepspeed_configs/zero2.json"}, ENV).value.deepspeed == "zero2"
    assert locs({**GOOD, "deepspeed": "my_configs/zero2.json"}) == {"deepspeed"}
    assert locs({**GOOD, "deepspeed": "deepspeed_configs/custom.json"}) == {"deepspeed"}


@pytest.mark.parametrize(
    "extra, loc",
    [
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha"),
        ({"noisy_embedding_alpha": 5.0}, "noisy_embedding_alpha"),
        ({"lr_quadratic_warmup": True}, "lr_quadratic_warmup"),
        ({"cosine_constant_lr_ratio": 0.8}, "cosine_constant_lr_ratio"),
        ({"group_by_length": True}, "group_by_length"),
        ({"added_tokens_overrides": {"5": "<x>"}}, "added_tokens_overrides"),
        (
            {"datasets": [{"path": "org/c", "type": "chat_template", "split_thinking": True}]},
            "datasets[0].split_thinking",
        ),
        (
            {"datasets": [{"path": "org/c", "type": "chat_template", "message_field_training_detail": "d"}]},
            "datasets[0].message_field_training_detail",
        ),
    ],
)
def test_features_ftw_does_not_implement_fail_at_validation_not_after_preprocessing(extra, loc):
    report = validate_config({**GOOD, **extra}, ENV)
    assert not report.valid
    assert [e.loc for e in report.errors] == [loc]
    assert "not supported" in report.errors[0].msg


@pytest.mark.parametrize(
    "extra", [{"group_by_length": False}, {"lr_quadratic_warmup": False}, {"neftune_noise_alpha": None}]
)
def test_unimplemented_features_switched_off_are_accepted(extra):
    assert validate_config({**GOOD, **extra}, ENV).valid

"""Training-config validation: key classes, cross-field rules, every error at once, no mutation."""

from __future__ import annotations

import copy

import pytest

from schemas.classify import ALL_KNOWN
from schemas.config import TrainingConfig
from schemas.datasets import DatasetConfig
from schemas.keys import ALIASES, DATASET_UNSUPPORTED, GATED, NO_EFFECT, UNSUPPORTED, UNSUPPORTED_PREFIXES
from schemas.validate import validate_config

ENV = {"BASE_VOLUME": "/volume"}
GOOD = {"base_model": "org/model", "learning_rate": 2e-4, "datasets": [{"path": "org/data", "type": "alpaca"}]}


def errors(raw, env=ENV):
    return {(i.loc, i.kind): i.msg for i in validate_config(raw, env).errors}


def locs(raw, env=ENV):
    return {i.loc for i in validate_config(raw, env).errors}


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


def test_rl_dpo_with_a_preference_type_is_valid():
    raw = {
        **GOOD,
        "adapter": "lora",
        "rl": "dpo",
        "rl_beta": 0.2,
        "datasets": [{"path": "org/prefs", "type": "chatml.intel"}],
    }
    report = validate_config(raw, ENV)
    assert report.valid, report.errors
    assert (report.value.rl_method(), report.value.rl_beta_value()) == ("dpo", 0.2)


@pytest.mark.parametrize(
    "raw, want",
    [
        ({"rl": "ppo"}, {("rl", "invalid")}),
        ({"rl": "gdpo"}, {("rl", "unsupported")}),
        ({"rl": "dpo", "orpo_alpha": 0.1}, {("orpo_alpha", "invalid")}),
        ({"rl": "dpo", "dpo_loss_type": ["hinge"]}, {("dpo_loss_type", "unsupported")}),
        ({"rl": "dpo", "dpo_use_weighting": True}, {("dpo_use_weighting", "unsupported")}),
        ({"rl": "dpo", "adapter": None}, {("rl", "unsupported")}),
        ({"rl": "orpo", "adapter": None}, set()),
        ({"rl": "dpo", "datasets": [{"path": "org/p", "type": "chatml.intl"}]}, {("datasets[0].type", "unsupported")}),
        (
            {"rl": "kto", "datasets": [{"path": "org/p", "type": {"field_prompt": "p"}}]},
            {("datasets[0].type", "invalid")},
        ),
        ({"rl": "grpo", "datasets": [{"path": "org/p", "type": "prompt_answer"}]}, {("trl.reward_funcs", "invalid")}),
        (
            {
                "rl": "grpo",
                "trl": {"reward_funcs": ["exact_match"], "reward_weights": [1, 2]},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            {("trl.reward_weights", "invalid")},
        ),
        (
            {
                "rl": "grpo",
                "trl": {"reward_funcs": ["exact_match"], "use_vllm": True, "vllm_mode": "server", "num_generaton": 4},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            {("trl.vllm_mode", "unsupported"), ("trl.num_generaton", "invalid")},
        ),
        (
            {
                "rl": "grpo",
                "adapter": None,
                "trl": {"reward_funcs": ["exact_match"], "use_vllm": True, "beta": 0, "vllm_server_port": 8000},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            {("trl.use_vllm", "unsupported"), ("trl.vllm_server_port", "unsupported")},
        ),
        (
            {
                "rl": "grpo",
                "trl": {"reward_funcs": ["exact_match"], "vllm_sync_interval": 4},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            {("trl.vllm_sync_interval", "invalid")},
        ),
        (
            {
                "rl": "grpo",
                "trl": {"reward_funcs": ["exact_match"], "use_vllm": True, "vllm_gpu_memory_utilization": 1.5},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            {("trl.vllm_gpu_memory_utilization", "invalid")},
        ),
        (
            {
                "rl": "grpo",
                "trl": {"reward_funcs": ["exact_match"], "use_vllm": True, "vllm_sync_interval": 4},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            set(),
        ),
        (
            {
                "rl": "grpo",
                "trl": {"reward_funcs": ["rwd.mine", "exact_mach"]},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            {("trl.reward_funcs[0]", "gated"), ("trl.reward_funcs[1]", "invalid")},
        ),
        ({"trl": {"beta": 0.1}}, {("trl", "invalid")}),
        (
            {
                "rl": "grpo",
                "trl": {"reward_funcs": ["regex_format"], "reward_regex": "("},
                "datasets": [{"path": "org/p", "type": "prompt_answer"}],
            },
            {("trl.reward_regex", "invalid")},
        ),
    ],
)
def test_rl_keys_fail_where_they_are_wrong(raw, want):
    base = {
        **GOOD,
        "adapter": "lora",
        "datasets": [{"path": "org/prefs", "type": "chatml.intel" if raw.get("rl") else "alpaca"}],
    }
    report = validate_config({**base, **raw}, ENV)
    assert {(i.loc, i.kind) for i in report.errors} == want, report.errors


STRIDED = {"path": "org/docs", "type": "ebft_pretrain.transform"}
STRUCTURED = {"path": "org/qa", "type": "ebft_opencode.transform"}


@pytest.mark.parametrize(
    "raw, want",
    [
        ({"ebft": {"mode": "strided"}, "datasets": [STRIDED]}, set()),
        ({"datasets": [STRUCTURED]}, set()),  # structured is the default mode
        ({"ebft": {"mode": "strided", "strid": 4}, "datasets": [STRIDED]}, {("ebft.strid", "invalid")}),
        ({"ebft": {"stride": 4}, "datasets": [STRUCTURED]}, {("ebft.stride", "invalid")}),
        (
            {"ebft": {"mode": "strided", "gt_length_multiplier": 2.0}, "datasets": [STRIDED]},
            {("ebft.gt_length_multiplier", "invalid")},
        ),
        ({"ebft": {"mode": "strided"}, "datasets": [STRUCTURED]}, {("datasets[0].type", "invalid")}),
        ({"ebft": {"mode": "structured"}, "datasets": [STRIDED]}, {("datasets[0].type", "invalid")}),
        (
            {
                "ebft": {
                    "mode": "strided",
                    "n_samples_per_prompt": 1,
                    "advantage_estimator": "rloo",
                    "diversity_coef": 1.0,
                },
                "datasets": [STRIDED],
            },
            {("ebft.advantage_estimator", "invalid"), ("ebft.diversity_coef", "invalid")},
        ),
        (
            {"ebft": {"mode": "strided", "feature_layers": [0.5, 1.5]}, "datasets": [STRIDED]},
            {("ebft.feature_layers[1]", "invalid")},
        ),
        ({"ebft": {"mode": "strided", "rl_coef": 0}, "datasets": [STRIDED]}, {("ebft.rl_coef", "invalid")}),
        ({"ebft": {"mode": "strided", "stride": 0}, "datasets": [STRIDED]}, {("ebft.stride", "invalid")}),
        (
            {"ebft": {"mode": "strided"}, "torch_compile": True, "datasets": [STRIDED]},
            {("torch_compile", "unsupported")},
        ),
        ({"ebft": {"mode": "strided"}, "sequence_len": 12, "datasets": [STRIDED]}, {("sequence_len", "invalid")}),
        ({"ebft": {"mode": "strided"}, "trl": {"num_generations": 4}, "datasets": [STRIDED]}, {("trl", "invalid")}),
        ({"trl": {"reward_funcs": ["exact_match"]}, "datasets": [STRUCTURED]}, {("trl.reward_funcs", "invalid")}),
        ({"trl": {"use_vllm": True, "vllm_sync_interval": 2}, "datasets": [STRUCTURED]}, set()),  # sync mode
        ({"adapter": None, "trl": {"use_vllm": True}, "datasets": [STRUCTURED]}, {("trl.use_vllm", "unsupported")}),
        ({"trl": {"async_prefetch": True}, "datasets": [STRUCTURED]}, {("trl.async_prefetch", "unsupported")}),
        ({"adapter": None, "deepspeed": "zero2", "datasets": [STRUCTURED]}, {("adapter", "unsupported")}),
        ({"datasets": [{"path": "org/p", "type": "chatml.intel"}]}, {("datasets[0].type", "unsupported")}),
    ],
)
def test_ebft_keys_fail_where_they_are_wrong(raw, want):
    report = validate_config({**GOOD, "adapter": "lora", "rl": "ebft", **raw}, ENV)
    assert {(i.loc, i.kind) for i in report.errors} == want, report.errors


def test_ebft_async_mode_is_refused_by_name():
    raw = {**GOOD, "adapter": "lora", "rl": "ebft", "datasets": [STRUCTURED]}
    report = validate_config({**raw, "trl": {"use_vllm": True, "async_prefetch": True}}, ENV)
    (issue,) = report.errors
    assert issue.loc == "trl.async_prefetch" and "EBFT structured mode's async mode" in issue.msg, issue


def test_ebft_one_sample_defaults_to_reinforce_without_diversity():
    raw = {**GOOD, "adapter": "lora", "rl": "ebft", "datasets": [STRIDED]}
    cfg = validate_config({**raw, "ebft": {"mode": "strided", "n_samples_per_prompt": 1}}, ENV).value
    assert (cfg.ebft.estimator(cfg.trl), cfg.ebft.diversity(cfg.trl)) == ("reinforce", 0.0)
    cfg = validate_config({**raw, "ebft": {"mode": "strided"}}, ENV).value
    assert (cfg.ebft.estimator(cfg.trl), cfg.ebft.diversity(cfg.trl)) == ("rloo", 1.0)


def test_a_config_written_back_in_full_validates_again():
    """A run's config.json is the validated config dumped with every key (defaults included): the
    stage children validate it again, so a key at its default is no method's option."""
    report = validate_config({**GOOD, "adapter": "lora"}, ENV)
    again = validate_config(report.value.model_dump(mode="json"), ENV)
    assert again.valid, again.errors


def test_user_reward_code_needs_the_gate_and_a_module_under_an_allowed_root(tmp_path):
    (tmp_path / "rwd").mkdir()
    (tmp_path / "rwd" / "mine.py").write_text(
        "def score(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    raw = {
        **GOOD,
        "adapter": "lora",
        "rl": "grpo",
        "trl": {"reward_funcs": ["rwd.mine.score", "rwd.other.score", "exact_match"]},
        "datasets": [{"path": "org/p", "type": "prompt_answer"}],
    }
    closed = validate_config(raw, {"BASE_VOLUME": str(tmp_path)})
    assert [(i.loc, i.kind) for i in closed.errors] == [
        ("trl.reward_funcs[0]", "gated"),
        ("trl.reward_funcs[1]", "gated"),
    ]
    assert "FTW_ALLOW_PLUGINS=1" in closed.errors[0].msg
    report = validate_config(raw, {"BASE_VOLUME": str(tmp_path), "FTW_ALLOW_PLUGINS": "1"})
    assert [(i.loc, i.kind) for i in report.errors] == [("trl.reward_funcs[1]", "invalid")]
    assert "rwd/other.py" in report.errors[0].msg
    outside = validate_config(raw, {"BASE_VOLUME": str(tmp_path / "rwd"), "FTW_ALLOW_PLUGINS": "1"})
    assert [i.loc for i in outside.errors] == ["trl.reward_funcs[0]", "trl.reward_funcs[1]"]


def test_preference_keys_without_rl_name_the_feature():
    raw = {**GOOD, "datasets": [{"path": "org/prefs", "type": "alpaca", "field_chosen": "c"}]}
    assert errors(raw) == {
        (
            "datasets[0].field_chosen",
            "invalid",
        ): "field_chosen is a key of preference/RL datasets; set rl (dpo, ipo, orpo, kto, simpo, grpo) or remove it"
    }


@pytest.mark.parametrize("key, value", [("liger_rope", True), ("swanlab_project", "p"), ("peft", {"loftq_config": {}})])
def test_unsupported_keys_are_named(key, value):
    report = validate_config({**GOOD, key: value}, ENV)
    assert [(i.loc, i.kind) for i in report.errors] == [(key, "unsupported")]
    assert key in report.errors[0].msg and "not supported" in report.errors[0].msg


def test_unsupported_keys_set_off_are_harmless():
    assert validate_config({**GOOD, "liger_rope": False, "qat": None, "unfrozen_parameters": []}, ENV).valid


def test_unknown_keys_warn_with_the_closest_key_and_never_block():
    report = validate_config(
        {**GOOD, "learnin_rate": 1, "datasets": [{"path": "org/data", "type": "alpaca", "feild": "x"}]}, ENV
    )
    assert report.valid
    msgs = {w.loc: w.msg for w in report.warnings}
    assert "did you mean 'learning_rate'" in msgs["learnin_rate"]
    assert "did you mean 'field'" in msgs["datasets[0].feild"]


def test_no_effect_keys_warn():
    report = validate_config({**GOOD, "strict": True, "output_dir": "./out"}, ENV)
    assert report.valid
    assert {w.loc for w in report.warnings} == {"strict", "output_dir"}


@pytest.mark.parametrize(
    "key, value, var",
    [
        ("plugins", ["axolotl.integrations.liger.LigerPlugin"], "FTW_ALLOW_PLUGINS"),
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


def test_torch_compile_backend_and_mode_are_checked_before_any_work():
    """torch would raise these only after the model is loaded, with no hint."""
    assert {"torch_compile_backend", "torch_compile_mode"} <= locs(
        {**GOOD, "torch_compile": True, "torch_compile_backend": "nope", "torch_compile_mode": "fastest"}
    )
    assert not errors(
        {**GOOD, "torch_compile": True, "torch_compile_backend": "inductor", "torch_compile_mode": "max-autotune"}
    )


@pytest.mark.parametrize(
    "raw",
    [
        {"ebft": {"mode": "strided", "n_samples_per_prompt": 1}, "datasets": [STRIDED]},
        {"trl": {"num_generations": 4}, "datasets": [STRUCTURED]},
    ],
)
def test_an_ebft_config_written_back_in_full_validates_again(raw):
    report = validate_config({**GOOD, "adapter": "lora", "rl": "ebft", **raw}, ENV)
    again = validate_config(report.value.model_dump(mode="json"), ENV)
    assert again.valid, again.errors


@pytest.mark.parametrize(
    "extra, says",
    [
        ({}, "not full fine-tuning"),
        ({"adapter": "qlora", "load_in_4bit": True}, "not a 4-bit or 8-bit base"),
        ({"adapter": "lora", "load_in_8bit": True}, "not a 4-bit or 8-bit base"),
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
    found = errors({**GOOD, "adapter": "lora", "fp8": True})
    assert "torchao" in found[("fp8", "unsupported")] and "fp8_base_weights: true" in found[("fp8", "unsupported")]

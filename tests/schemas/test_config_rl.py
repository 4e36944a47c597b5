"""Training-config rules of the RL methods: the preference family (DPO, KTO, ...), GRPO rewards, EBFT."""

from __future__ import annotations

import pytest

from schemas.validate import validate_config
from tests.schemas.configs import ENV, GOOD, errors


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

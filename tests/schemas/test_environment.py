"""Operator defaults and overrides from the environment (FTW_CONFIG_DEFAULTS / FTW_CONFIG_OVERRIDES)."""

from __future__ import annotations

import json

from schemas.job import validate_job
from schemas.validate import validate_config

GOOD = {"base_model": "org/model", "learning_rate": 2e-4, "datasets": [{"path": "org/data", "type": "alpaca"}]}


def env(**layers):
    out = {"BASE_VOLUME": "/volume"}
    for name, value in layers.items():
        out[f"FTW_CONFIG_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def test_defaults_fill_only_what_the_job_leaves_out():
    report = validate_config(
        {**GOOD, "sequence_len": 1024}, env(defaults={"sequence_len": 4096, "gradient_checkpointing": True})
    )
    assert report.valid and report.warnings == []
    assert (report.value.sequence_len, report.value.gradient_checkpointing) == (1024, True)


def test_overrides_win_and_the_job_is_told():
    report = validate_config(
        {**GOOD, "micro_batch_size": 64}, env(overrides={"micro_batch_size": 2, "save_total_limit": 1})
    )
    assert report.valid
    assert (report.value.micro_batch_size, report.value.save_total_limit) == (2, 1)
    assert [(w.loc, "FTW_CONFIG_OVERRIDES" in w.msg) for w in report.warnings] == [("micro_batch_size", True)]


def test_an_override_equal_to_the_job_value_is_silent():
    report = validate_config({**GOOD, "micro_batch_size": 2}, env(overrides={"micro_batch_size": 2}))
    assert report.valid and report.warnings == []


def test_override_can_switch_a_feature_off_for_every_job():
    report = validate_config({**GOOD, "sample_packing": True}, env(overrides={"sample_packing": False}))
    assert report.valid and report.value.sample_packing is False


def test_override_cannot_unlock_a_gated_key_without_its_variable():
    report = validate_config(GOOD, env(overrides={"trust_remote_code": True}))
    assert [(i.loc, i.kind) for i in report.errors] == [("trust_remote_code", "gated")]
    assert "FTW_CONFIG_OVERRIDES" in report.errors[0].msg  # the user is told the operator must fix it
    allowed = validate_config(GOOD, {**env(overrides={"trust_remote_code": True}), "FTW_ALLOW_REMOTE_CODE": "1"})
    assert allowed.valid and allowed.value.trust_remote_code is True


def test_a_bad_operator_value_is_blamed_on_the_operator():
    report = validate_config(GOOD, env(defaults={"sequence_len": -5}))
    assert [i.loc for i in report.errors] == ["sequence_len"]
    assert "FTW_CONFIG_DEFAULTS" in report.errors[0].msg and "operator" in report.errors[0].msg
    # the job's own value replaces the bad default, and the problem is gone
    assert validate_config({**GOOD, "sequence_len": 256}, env(defaults={"sequence_len": -5})).valid


def test_job_values_are_not_blamed_on_the_operator():
    report = validate_config({**GOOD, "sequence_len": -5}, env(defaults={"sequence_len": 2048}))
    assert [i.loc for i in report.errors] == ["sequence_len"]
    assert "FTW_CONFIG" not in report.errors[0].msg


def test_malformed_layers_are_errors_not_half_applied():
    report = validate_config(GOOD, env(defaults="{not json", overrides="[1, 2]"))
    assert {i.loc for i in report.errors} == {"FTW_CONFIG_DEFAULTS", "FTW_CONFIG_OVERRIDES"}
    assert all("operator" in i.msg for i in report.errors)


def test_defaults_can_supply_required_keys_for_a_single_model_endpoint():
    report = validate_config(
        {"datasets": GOOD["datasets"]}, env(defaults={"base_model": "org/model", "learning_rate": 1e-4})
    )
    assert report.valid and report.value.base_model == "org/model"


def test_jobs_see_the_same_layers():
    job = {"input": {"run_id": "r1", "args": {**GOOD, "micro_batch_size": 64}}}
    report = validate_job(job, env=env(overrides={"micro_batch_size": 2}))
    assert report.valid and report.value.config.micro_batch_size == 2
    assert [w.loc for w in report.warnings] == ["config.micro_batch_size"]


def test_validation_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("FTW_CONFIG_OVERRIDES", json.dumps({"seed": 7}))
    assert validate_config(GOOD).value.seed == 7

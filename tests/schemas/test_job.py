"""The job input: accepted shapes, run_id rules, outputs, and credentials that never leak."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.job import JobInput, check_run_id, run_id_from_job_id, validate_job

ENV = {"BASE_VOLUME": "/volume"}
CONFIG = {
    "base_model": "org/model",
    "learning_rate": 2e-4,
    "adapter": "lora",
    "datasets": [{"path": "org/data", "type": "alpaca"}],
}
SECRETS = {
    "hf_token": "hf_SECRETtokenVALUE123",
    "wandb_api_key": "wandbSECRETkey456789",
    "aws_access_key_id": "AKIASECRETID0001",
    "aws_secret_access_key": "awsSECRETaccessKEY/xyz",
    "aws_session_token": "sessionSECRETtoken999",
}


def job(**fields):
    return {"input": {"run_id": "run-1", "config": CONFIG, **fields}}


def test_axolotl_worker_shape_is_accepted():
    raw = {
        "input": {
            "run_id": "exp_7",
            "args": CONFIG,
            "credentials": {"hf_token": SECRETS["hf_token"], "wandb_api_key": SECRETS["wandb_api_key"]},
            "user_id": "u1",
            "model_id": "m1",
        }
    }
    report = validate_job(raw, env=ENV)
    assert report.valid, report.errors
    value = report.value
    assert (value.run_id, value.config.base_model, value.user_id) == ("exp_7", "org/model", "u1")
    assert value.credentials.hf_token.get_secret_value() == SECRETS["hf_token"]


def test_bare_input_and_runpod_envelope_are_the_same_job():
    bare = validate_job({"run_id": "r", "config": CONFIG}, env=ENV).value
    wrapped = validate_job({"id": "abc", "input": {"run_id": "r", "config": CONFIG}}, env=ENV).value
    assert bare == wrapped


def test_run_id_defaults_from_the_runpod_job_id():
    assert (
        validate_job({"input": {"config": CONFIG}}, job_id="sync-42ab/../x", env=ENV).value.run_id == "sync-42ab-..-x"
    )
    # axolotl's worker default would make every job share one run folder
    assert (
        validate_job({"input": {"run_id": "default_run_id", "config": CONFIG}}, job_id="job9", env=ENV).value.run_id
        == "job9"
    )
    assert check_run_id(run_id_from_job_id("")) is None and check_run_id(run_id_from_job_id("../..")) is None


@pytest.mark.parametrize(
    "run_id, reason",
    [
        ("../x", "path separator"),
        ("/abs", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("", "empty"),
        ("x" * 1000, "1000 characters"),
        ("x" * 65, "65 characters"),
        ("ab\x00c", "NUL"),
        ("rün", "non-ASCII"),
        ("\u0430dmin", "non-ASCII"),  # Cyrillic а
        ("run\uff0fx", "non-ASCII"),  # fullwidth solidus
        ("run\u2024x", "non-ASCII"),  # one dot leader
        (".hidden", "starts with '.'"),
        ("..", "starts with '.'"),
        ("-rf", "starts with '-'"),
        ("a b", "characters other than"),
        ("a:b", "characters other than"),
        (7, "must be a string"),
        (["r"], "must be a string"),
    ],
)
def test_bad_run_ids_are_rejected_by_name(run_id, reason):
    report = validate_job(job(run_id=run_id), env=ENV)
    assert [i.loc for i in report.errors] == ["run_id"]
    assert reason in report.errors[0].msg and "run_id" in report.errors[0].msg


@pytest.mark.parametrize("run_id", ["a", "A1", "run-2026.11.28_x", "x" * 64, "0"])
def test_good_run_ids(run_id):
    assert validate_job(job(run_id=run_id), env=ENV).value.run_id == run_id


def test_outputs_and_limits():
    report = validate_job(
        job(
            outputs={
                "s3": {"bucket": "my-bucket", "prefix": "/ft/runs/", "endpoint_url": "http://127.0.0.1:9000"},
                "hub": {"repo_id": "me/adapter", "revision": "v1"},
            },
            publish=["adapter", "merged"],
            limits={"train_s": 3600},
        ),
        env=ENV,
    )
    assert report.valid, report.errors
    out = report.value.outputs
    assert (out.s3.prefix, out.hub.private, report.value.limits.train_s) == ("ft/runs", True, 3600)


def test_every_job_error_at_once():
    raw = {
        "input": {
            "run_id": "../x",
            "args": {**CONFIG, "learning_rate": 0},
            "outputs": {"s3": {"bucket": "B", "prefix": "a/../b"}},
            "publish": ["everything"],
            "limits": {"train_s": -1},
            "surprise": 1,
        }
    }
    report = validate_job(raw, env=ENV)
    assert {i.loc for i in report.errors} == {
        "run_id",
        "config.learning_rate",
        "outputs.s3.bucket",
        "outputs.s3.prefix",
        "publish[0]",
        "limits.train_s",
    }
    assert [i.loc for i in report.warnings] == ["surprise"]


def test_config_and_args_together_is_an_error():
    assert "args" in {i.loc for i in validate_job({"run_id": "r", "config": CONFIG, "args": CONFIG}, env=ENV).errors}


def test_missing_config():
    report = validate_job({"input": {"run_id": "r"}}, env=ENV)
    assert [i.loc for i in report.errors] == ["config"]


def test_a_bare_training_config_sent_as_a_job_gets_one_message_saying_how_to_wrap_it():
    report = validate_job({"input": CONFIG}, env=ENV)
    assert len(report.errors) == 1 and report.errors[0].loc == "input"
    assert "training config, not a job" in report.errors[0].msg and '"config"' in report.errors[0].msg


def test_credentials_never_leave_the_secret_box():
    report = validate_job(job(credentials=SECRETS), env=ENV)
    assert report.valid
    value = report.value
    shown = [
        json.dumps(value.public_dict()),
        repr(value),
        str(value),
        value.model_dump_json(),
        repr(value.credentials),
        str(value.model_dump()),
        json.dumps(report.as_dict()),
    ]
    for text in shown:
        for secret in SECRETS.values():
            assert secret not in text
    assert "credentials" not in value.public_dict()
    assert sorted(value.credentials.secrets()) == sorted(SECRETS.values())


@pytest.mark.parametrize(
    "credentials",
    [
        "hf_SECRETtokenVALUE123",
        ["hf_SECRETtokenVALUE123"],
        {"hf_token": ["hf_SECRETtokenVALUE123"]},
        {"hf_token": {"v": "hf_SECRETtokenVALUE123"}},
        {"hf_SECRETtokenVALUE123": "x"},
        {"hf_tokn": "hf_SECRETtokenVALUE123"},
        {"hf_token": 12345678901234},
    ],
)
def test_malformed_credentials_are_rejected_without_echoing_them(credentials):
    report = validate_job(
        {
            "input": {
                "run_id": "hf_SECRETtokenVALUE123",
                "config": {**CONFIG, "wandb_project": "hf_SECRETtokenVALUE123"},
                "credentials": credentials,
            }
        },
        env=ENV,
    )
    assert not report.valid
    assert any(i.loc.startswith("credentials") for i in report.errors)
    text = json.dumps(report.as_dict())
    assert "hf_SECRETtokenVALUE123" not in text and "12345678901234" not in text


def test_job_input_model_refuses_unknown_keys():
    with pytest.raises(ValidationError, match="nope"):
        JobInput.model_validate({"run_id": "r", "config": CONFIG, "nope": 1})


def test_unknown_job_keys_suggest_the_closest():
    """Top-level: a warning, as for config keys; inside outputs/limits: still an error (a typo there
    would publish to the wrong place or drop a limit)."""
    report = validate_job({"input": {"run_id": "r", "config": CONFIG, "output": {}, "limits": {"train": 5}}}, env=ENV)
    assert {i.loc: i.msg for i in report.errors} == {"limits.train": "unknown key; did you mean 'train_s'?"}
    assert {i.loc: i.msg for i in report.warnings} == {
        "output": "unknown key 'output' is ignored; did you mean 'outputs'?"
    }


@pytest.mark.parametrize("key", ["configs", "config_extra", "run_ids", "args2"])
def test_keys_that_start_like_known_ones_are_still_unknown(key):
    report = validate_job({"input": {"run_id": "r", "config": CONFIG, key: 1}}, env=ENV)
    assert report.valid and [i.loc for i in report.warnings] == [key]


def test_a_real_payload_of_axolotls_runpod_worker_is_accepted():
    """Its .runpod/test-input.json carries name, user_id, model_id and timeout (the RunPod Hub test
    runner's wait in ms, which its handler never reads) beside run_id/args/credentials."""
    raw = {
        "input": {
            "name": "quick_smoke_test_sft",
            "user_id": "user",
            "model_id": "llama-test",
            "run_id": "llama-test",
            "credentials": {"wandb_api_key": "", "hf_token": ""},
            "args": CONFIG,
            "timeout": 100000,
        }
    }
    report = validate_job(raw, env=ENV)
    assert report.valid, report.errors
    assert [i.loc for i in report.warnings] == ["timeout"] and "not a job limit" in report.warnings[0].msg
    assert (report.value.user_id, report.value.model_id) == ("user", "llama-test")


def test_an_unknown_job_key_named_like_a_secret_is_dropped_with_a_warning_that_never_shows_it():
    report = validate_job(
        {
            "input": {
                "run_id": "r",
                "config": {**CONFIG, "wandb_key": "x"},
                "hf_token": "hf_TOPLEVELsecret99",
                "hfToken": "hf_CAMELsecret77",
                "hf_SECRETused_as_key_1234567": 1,
            }
        },
        env=ENV,
    )
    assert report.valid
    text = str(report.as_dict())
    assert "SECRET" not in text and "hf_TOPLEVEL" not in text and "hf_CAMEL" not in text
    assert {i.loc for i in report.warnings} == {
        "hf_token",
        "input",
        "config.wandb_key",
    }  # hfToken and the pasted token: not names
    assert "looks like a credential" in {i.loc: i.msg for i in report.warnings}["hf_token"]
    assert "hf_token" not in str(report.value.public_dict())


def test_credential_errors_name_the_key_and_never_show_the_value():
    credentials = {
        "hf_token": ["hf_SECRETinLIST123"],
        "aws_secret_access_key": 98765432101234,
        "openai_key": "sk-SECRETopenai777",
        "hf_tokn": "hf_SECRETmistyped42",
    }
    report = validate_job(job(credentials=credentials), env=ENV)
    messages = {i.loc: i.msg for i in report.errors}
    assert messages == {
        "credentials.hf_token": "must be a string",
        "credentials.aws_secret_access_key": "must be a string",
        "credentials.openai_key": (
            "unknown key; accepted: hf_token, wandb_api_key, aws_access_key_id, aws_secret_access_key, "
            "aws_session_token"
        ),
        "credentials.hf_tokn": (
            "unknown key; accepted: hf_token, wandb_api_key, aws_access_key_id, aws_secret_access_key, "
            "aws_session_token; did you mean 'hf_token'?"
        ),
    }
    text = json.dumps(report.as_dict()) + repr(report.errors)
    for value in ("hf_SECRETinLIST123", "98765432101234", "sk-SECRETopenai777", "hf_SECRETmistyped42"):
        assert value not in text


@pytest.mark.parametrize(
    "token_as_key", ["hf_AbCdEfGhIjKlMnOpQrStUvWxYz", "AKIAIOSFODNN7EXAMPLE", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"]
)
def test_a_token_pasted_as_a_credential_key_is_not_shown(token_as_key):
    report = validate_job(job(credentials={token_as_key: "x"}), env=ENV)
    assert [i.loc for i in report.errors] == ["credentials"]
    assert "accepted names: hf_token" in report.errors[0].msg
    assert token_as_key not in json.dumps(report.as_dict())

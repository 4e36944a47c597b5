"""Property tests: any JSON a client can send is answered with a report, never an exception.

Every rejection has a location, except whole-document errors (the config is not a mapping),
which say so; a valid report carries its value; credentials never show up in any report.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.config import TrainingConfig
from schemas.datasets import DatasetConfig
from schemas.job import JobInput, validate_job
from schemas.validate import validate_config

ENV = {"BASE_VOLUME": "/volume"}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# real key names make the fuzz reach past the first check into the typed fields and the rules
CONFIG_KEYS = sorted(TrainingConfig.model_fields) + [
    "rl",
    "plugins",
    "flash_attention",
    "model_type",
    "torch_dtype",
    "liger_rope",
]
JOB_KEYS = [
    "run_id",
    "config",
    "args",
    "outputs",
    "publish",
    "resume",
    "limits",
    "credentials",
    "user_id",
    "model_id",
    "configs",
    "run_id2",
]
DATASET_KEYS = sorted(DatasetConfig.model_fields) + ["field_chosen", "trust_remote_code", "conversation"]
dataset_entries = st.dictionaries(
    st.sampled_from(DATASET_KEYS),
    json_values | st.sampled_from(["alpaca", "chat_template", "sharegpt", "a.b"]),
    max_size=6,
)
good_config = st.fixed_dictionaries(
    {
        "base_model": st.just("org/model"),
        "learning_rate": st.just(1e-4),
        "datasets": st.just([{"path": "org/data", "type": "alpaca"}]),
    }
)
configs = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=8),
    st.builds(
        lambda base, ds: {**base, "datasets": ds}, good_config, st.lists(dataset_entries, min_size=1, max_size=3)
    ),
    st.builds(
        lambda base, extra: {**base, **extra},
        good_config,
        st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=3),
    ),
)
jobs = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(JOB_KEYS), json_values | configs, max_size=6),
    st.builds(
        lambda cfg, extra: {"input": {"config": cfg, **extra}},
        configs,
        st.dictionaries(st.sampled_from(JOB_KEYS[3:]), json_values, max_size=3),
    ),
)


def check_report(report, expected_type):
    assert report.valid == (not report.errors)
    for issue in report.errors + report.warnings:
        assert isinstance(issue.loc, str) and isinstance(issue.msg, str) and issue.msg.strip()
    for issue in report.errors:
        assert issue.loc or "mapping" in issue.msg, issue  # only a whole-document error has no location
    if report.valid:
        assert isinstance(report.value, expected_type)
    else:
        assert report.value is None
    json.dumps(report.as_dict())  # the --json shape always serialises


@SETTINGS
@given(configs)
def test_validate_config_never_raises(raw):
    check_report(validate_config(raw, ENV), TrainingConfig)


@SETTINGS
@given(jobs, st.none() | st.text(max_size=70))
def test_validate_job_never_raises(raw, job_id):
    report = validate_job(raw, job_id=job_id, env=ENV)
    check_report(report, JobInput)
    if report.valid:
        assert report.value.config.learning_rate > 0 and math.isfinite(report.value.config.num_epochs)


secrets = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789_/+", min_size=12, max_size=40).map(lambda s: "sk_" + s)
credential_shapes = st.one_of(
    secrets,
    st.lists(secrets, max_size=2),
    st.dictionaries(
        st.sampled_from(
            ["hf_token", "wandb_api_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"]
        ),
        secrets,
        min_size=1,
    ),
    st.dictionaries(
        st.sampled_from(["hf_token", "hf_tokn", "token"]),
        secrets | st.lists(secrets, max_size=2) | st.dictionaries(secrets, secrets, max_size=2),
        min_size=1,
    ),
    st.dictionaries(secrets, st.text(max_size=5) | st.integers(), min_size=1, max_size=2),
)


@SETTINGS
@given(credential_shapes, st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=3), st.booleans())
def test_credentials_never_appear_in_any_report(credentials, config_extra, echo_elsewhere):
    found = []

    def collect(v):
        if isinstance(v, str):
            found.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                collect(k)
                collect(x)
        elif isinstance(v, list):
            for x in v:
                collect(x)

    collect(credentials)
    planted = [s for s in found if s.startswith("sk_")]
    config = {
        "base_model": "org/model",
        "learning_rate": 1e-4,
        "datasets": [{"path": "org/data", "type": "alpaca"}],
        **config_extra,
    }
    run_id = planted[0] if echo_elsewhere and planted else "r1"  # a user pasting the token in the wrong field
    report = validate_job({"input": {"run_id": run_id, "config": config, "credentials": credentials}}, env=ENV)
    shown = json.dumps(report.as_dict()) + repr(report.errors) + repr(report.warnings)
    if report.valid and not echo_elsewhere:  # a token pasted as run_id is, from then on, the run's name
        value = report.value
        shown += json.dumps(value.public_dict()) + repr(value) + str(value) + value.model_dump_json()
    for secret in planted:
        assert secret not in shown


def nest(depth):
    value = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_deep_nesting_is_a_located_error_not_a_recursion_error():
    """Recursive code (pydantic's repr, our walkers) must never meet a 5000-level document."""
    config = {"base_model": "org/model", "learning_rate": 1e-4, "datasets": [{"path": "org/data", "type": "alpaca"}]}
    for where in ("credentials", "outputs", "user_id"):
        report = validate_job({"input": {"run_id": "r", "config": config, where: nest(5000)}}, env=ENV)
        assert [(i.loc, "levels deep" in i.msg) for i in report.errors] == [("input", True)]
    check_report(validate_config({**config, "lora_target_modules": nest(5000)}, ENV), TrainingConfig)
    assert validate_config(
        {**config, "overrides_of_model_config": {"rope_scaling": nest(9)}}, ENV
    ).valid  # real configs nest a few levels

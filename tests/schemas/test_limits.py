"""Hostile documents: too deep, too big, alias bombs, odd encodings — refused with one clear line.

Each was found by trying it: JSON nested 100,000 deep made `ftw validate/run/submit` print a
RecursionError traceback (exit 1) and the endpoint's /run answer 500; YAML nested 50,000 deep
crashed the process (SIGSEGV); a 9-level YAML alias chain ran for minutes; a 9 MB value was
quoted whole in the error line.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from schemas.job import validate_job
from schemas.limits import EXCERPT_CHARS, MAX_DEPTH, DocumentError, excerpt, parse_json, parse_yaml
from tests.conftest import REPO, child_env
from tests.job.conftest import example_job

DEEP_JSON = '{"input": ' + "[" * 100_000 + "]" * 100_000 + "}"
DEEP_YAML = "a: " + "[" * 50_000 + "]" * 50_000 + "\n"
DEEP_BLOCK_YAML = "a:\n" + "".join(" " * i + "- \n" for i in range(1, 200))  # block style: one level per line
# nine levels of nine aliases each: 9**9 (387 million) values once expanded
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


def ftw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(RUNPOD_ENDPOINT_BASE_URL="http://127.0.0.1:9/v2", RUNPOD_API_KEY="k", RUNPOD_ENDPOINT_ID="e"),
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("deep.json", DEEP_JSON, f"more than {MAX_DEPTH} levels deep"),
        ("deep.yml", DEEP_YAML, f"more than {MAX_DEPTH} levels deep"),
        ("bomb.yml", ALIAS_BOMB, "expands to more than"),
    ],
    ids=["json-100k-deep", "yaml-50k-deep", "yaml-alias-bomb"],
)
@pytest.mark.parametrize("command", ["validate", "run", "submit"])
def test_hostile_documents_are_refused_with_one_line_and_exit_2(tmp_path, name, text, says, command):
    path = tmp_path / name
    path.write_text(text)
    done = ftw(command, str(path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and len(done.stderr) < 500


def test_the_endpoint_answers_400_to_a_body_nested_100000_deep(tmp_path):
    from tests.endpoint.conftest import Api, start_endpoint

    endpoint = start_endpoint(tmp_path, handler_kind=None)
    try:
        api = Api(endpoint)
        r = api.session.post(api.url("run"), data=DEEP_JSON, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "levels deep" in r.json()["error"], r.text[:500]
        r = api.session.post(api.url("run"), data='{"input": {"a": NaN}}', timeout=30)
        assert r.status_code == 400 and "NaN" in r.json()["error"]
        assert (
            requests.get(
                f"{endpoint.base_url}/{endpoint.endpoint_id}/health", timeout=10, headers=api.session.headers
            ).status_code
            == 200
        )  # still serving
    finally:
        endpoint.stop()


@pytest.mark.parametrize(
    "text, says",
    [
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number"),
        ('{"a": 1, "a": 2}', "the key 'a' appears twice"),
        ('{"a": "\\ud800"}', "lone UTF-16 surrogate"),
        ('{"a": ' + "9" * 5000 + "}", "4300"),
        ('{"a": [1,', "not valid JSON"),
    ],
    ids=["nan", "infinity", "duplicate-key", "lone-surrogate", "5000-digit-int", "truncated"],
)
def test_json_that_python_accepts_but_is_not_a_sound_document_is_refused(text, says):
    with pytest.raises(DocumentError) as e:
        parse_json(text.encode())
    assert says in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize(
    "text, says",
    [
        ("a: 1\na: 2\n", "twice in one mapping"),
        ("a: " + "9" * 5000 + "\n", "4300"),
        ("a: [unclosed\n", "not valid YAML"),
        (DEEP_BLOCK_YAML, "levels deep"),
        ("a: &a [*a]\n", "levels deep"),  # an alias inside its own anchor: a cycle
    ],
    ids=["duplicate-key", "5000-digit-int", "broken", "deep-block-style", "self-alias"],
)
def test_yaml_that_is_not_a_sound_document_is_refused(text, says):
    with pytest.raises(DocumentError) as e:
        parse_yaml(text.encode())
    assert says in str(e.value) and len(str(e.value)) < 400


def test_sound_documents_still_parse_and_a_bom_is_tolerated():
    assert parse_json(b'\xef\xbb\xbf{"a": [1, 2.5, "\\ud83d\\ude00"]}') == {"a": [1, 2.5, "\U0001f600"]}
    assert parse_yaml("base: &b {lr: 0.1}\nfirst: *b\nsecond:\n  <<: *b\n  lr: 0.2\n") == {
        "base": {"lr": 0.1},
        "first": {"lr": 0.1},
        "second": {"lr": 0.2},
    }
    with pytest.raises(DocumentError, match="not UTF-8"):
        parse_json(b'{"a": "\xff"}')


def test_an_error_quotes_a_short_excerpt_of_a_9mb_value():
    """A 50 MB value used to make a 52 MB error line; the excerpt keeps the start and says the length."""
    huge = "x" * 9_000_000
    job = example_job(
        config={"datasets": [{"path": "org/data", "type": huge}], "chat_template_jinja": 5, "optimizer": huge, huge: 1}
    )
    report = validate_job(job, env={})
    assert not report.valid
    for issue in report.errors + report.warnings:
        assert len(str(issue)) < 1000, str(issue)[:300]
    assert any("(9,000,000 characters)" in i.msg for i in report.errors)
    assert excerpt("y" * 10_000).startswith("'" + "y" * EXCERPT_CHARS + "'...") and excerpt(2**4000).startswith(
        "<an integer"
    )
    assert "pa55" not in excerpt(
        "https://alice:pa55word@host/" + "p" * 500
    )  # a URL's password is masked before the cut


@pytest.mark.parametrize(
    "config, loc, says",
    [
        ({"seed": -1}, "config.seed", "greater than or equal to 0"),
        ({"seed": 2**70}, "config.seed", "out of range"),
        ({"max_steps": True}, "config.max_steps", "must be a number, not true"),
        ({"micro_batch_size": 2**70}, "config.micro_batch_size", "out of range"),
        ({"learning_rate": False}, "config.learning_rate", "must be a number, not false"),
        (
            {"datasets": [{"path": "org/d", "type": "alpaca", "shards": True}]},
            "config.datasets[0].shards",
            "must be a number",
        ),
    ],
    ids=["seed-negative", "seed-2**70", "max_steps-true", "batch-2**70", "lr-false", "dataset-shards-true"],
)
def test_booleans_are_not_numbers_and_out_of_range_numbers_are_refused(config, loc, says):
    """`seed: -1` and `2**70` used to pass, then fail in training as a retryable crash; `max_steps: true` trained
    one step."""
    report = validate_job(example_job(config=config), env={})
    assert [i.loc for i in report.errors] == [loc] and says in report.errors[0].msg, report.errors


def test_a_boolean_time_limit_is_refused():
    report = validate_job(example_job(limits={"train_s": True}), env={})
    assert [(i.loc, i.msg) for i in report.errors] == [("limits.train_s", "must be a number, not true")]

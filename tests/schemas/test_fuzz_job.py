"""Fuzzing the job JSON as an outsider would: every document gets an answer, never a traceback.

In process, `ftw validate`'s own `main` reads a generated job file (valid jobs mutated with hostile
values, odd encodings and broken bytes) and must exit 0, 2 or 3 with a readable report. A few
hostile files then go through the real `ftw validate` and `ftw run` processes. "Bounded time": each
example must finish within hypothesis' deadline (generous for a loaded machine; a quadratic scan of
the 200,000-character values drawn here takes minutes), and each process within its timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.config import TrainingConfig
from tests.conftest import REPO, child_env
from tests.job.conftest import example_job
from worker import cli
from worker.cli import EXIT_INVALID, EXIT_USAGE
from worker.cli import EXIT_OK as EXIT_VALID

CONFIG_KEYS = sorted(TrainingConfig.model_fields)
HOSTILE_STRINGS = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "\ud800",
        "\U0001f600",
        "\ufeff",
        "x" * 200_000,
        "a://" + "b" * 200_000,
        "?token=" * 20_000,
        "https://u:p@127.0.0.1/x?X-Amz-Signature=s",
        "../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        "~",
        "{{ x }}" * 1000,
        "org/model",
        "./models/ftw-tiny-chatml",
        "-1",
        "1e400",
        "nan",
        "true",
    ]
)
HOSTILE_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**53 + 1, 2**70, -(2**70), 10**4000 // 10**3990, 1e308, -0.0, 0.5, True, False]
)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    HOSTILE_STRINGS,
    HOSTILE_NUMBERS,
)
KEYS = st.text(max_size=8) | HOSTILE_STRINGS
JSON_VALUES = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def jobs(draw) -> dict:
    job = example_job()
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4)):
        job["config"][key] = draw(JSON_VALUES)
    top_keys = [
        "run_id",
        "outputs",
        "publish",
        "limits",
        "credentials",
        "resume",
        "name",
        "timeout",
        "user_id",
        "extra",
        "hf_token",
    ]
    for key in draw(st.lists(st.sampled_from(top_keys), max_size=3)):
        job[key] = draw(JSON_VALUES)
    datasets = job["config"].get("datasets")
    if isinstance(datasets, list) and datasets and isinstance(datasets[0], dict) and draw(st.booleans()):
        datasets[0][draw(st.sampled_from(["path", "type", "split", "data_files", "field_messages", "zz"]))] = draw(
            JSON_VALUES
        )
    if draw(st.integers(0, 9)) == 0:
        job["config"]["deepspeed"] = nested(draw(st.integers(20, 60)))
    return {"input": job} if draw(st.booleans()) else job


MUTATIONS = st.sampled_from(["none", "bom", "truncate", "nul", "invalid-utf8", "duplicate-key", "nan", "crlf"])


def mutate(text: str, how: str, cut: int) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "truncate":
        return data[: cut % max(len(data), 1)]
    if how == "nul":
        return data[: cut % max(len(data), 1)] + b"\x00" + data[cut % max(len(data), 1) :]
    if how == "invalid-utf8":
        return data[:1] + b"\xff\xfe" + data[1:]
    if how == "duplicate-key":
        return data.replace(b'"run_id"', b'"run_id": "a", "run_id"', 1)
    if how == "nan":
        return data.replace(b'"learning_rate": 0.003', b'"learning_rate": NaN', 1)
    if how == "crlf":
        return data.replace(b"\n", b"\r\n")
    return data


@settings(
    max_examples=150,
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(job=jobs(), how=MUTATIONS, cut=st.integers(0, 10_000), suffix=st.sampled_from([".json", ".yml"]))
def test_every_job_document_gets_an_answer_never_a_traceback(job, how, cut, suffix):
    text = json.dumps(job, ensure_ascii=bool(cut % 2), indent=cut % 3 or None)
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        tempfile.TemporaryDirectory() as folder,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        path = Path(folder) / f"job{suffix}"
        path.write_bytes(mutate(text, how, cut))
        code = cli.main(["validate", str(path), "--json"])
    out, err = stdout.getvalue(), stderr.getvalue()
    assert code in (EXIT_VALID, EXIT_USAGE, EXIT_INVALID)
    if code == EXIT_USAGE:
        assert out == "" and len(err.strip().splitlines()) == 1 and len(err) < 1000, err[:1000]
    else:
        report = json.loads(out)
        assert report["valid"] == (code == EXIT_VALID)
        assert all(len(i["msg"]) < 5000 and len(i["loc"]) < 1000 for i in report["errors"] + report["warnings"])
        assert len(report["errors"]) <= 100 and len(report["warnings"]) <= 100


HOSTILE_FILES = {
    "deep.json": b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nul.json": b'{"input": {"run_id": "a\x00b", "config": {}}}',
    "invalid-utf8.json": b'{"input": {"run_id": "\xff"}}',
    "surrogate.json": b'{"input": {"run_id": "r", "config": {"base_model": "\\udc80"}}}',
    "huge-number.json": b'{"input": {"run_id": "r", "config": {"seed": 1' + b"0" * 5000 + b"}}}",
    "nan.json": b'{"input": {"run_id": "r", "config": {"learning_rate": NaN}}}',
    "bom-9mb.json": b"\xef\xbb\xbf"
    + json.dumps({"input": example_job(config={"datasets": [{"path": "o/d", "type": "x" * 9_000_000}]})}).encode(),
}


RUN_TOO = ("bom-9mb.json", "surrogate.json", "huge-number.json")  # each `ftw run` process costs seconds of imports


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_the_real_cli_answers_hostile_files_with_a_line_and_an_exit_code(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE_FILES[name])
    env = child_env(BASE_VOLUME=str(tmp_path / "volume"))
    commands = [("validate", (2, 3))] + (
        [("run", (1, 2))] if name in RUN_TOO else []
    )  # `ftw run`: 1 is a failed (invalid) job
    for command, codes in commands:
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", command, str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert done.returncode in codes, (command, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and len(done.stdout) + len(done.stderr) < 20_000, (
            command,
            done.stderr[-2000:],
        )
        if command == "run" and done.returncode == 1:
            assert json.loads(done.stdout.strip().splitlines()[-1])["error"]["code"] == "invalid_job"

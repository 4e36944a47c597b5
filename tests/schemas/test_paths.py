"""Local paths in a config cannot leave BASE_VOLUME / FTW_ALLOWED_PATHS: symlinks, `..`, file://, `~`, NUL."""

from __future__ import annotations

import os

import pytest

from schemas.paths import check_local_path, resolve_local_path
from schemas.validate import validate_config


@pytest.fixture
def roots(tmp_path):
    """BASE_VOLUME with a dataset in it, an extra allowed folder, and a secret folder outside both."""
    vol, extra, outside = tmp_path / "volume", tmp_path / "models", tmp_path / "secret"
    for d in (vol / "data", extra, outside):
        d.mkdir(parents=True)
    (vol / "data" / "train.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n')
    (outside / "passwd").write_text("root:x:0:0\n")
    os.symlink(outside, vol / "link-out")  # a folder link planted inside the volume
    os.symlink(outside / "passwd", vol / "data" / "p.jsonl")  # a file link
    os.symlink(vol / "data", vol / "link-in")  # a link that stays inside is fine
    env = {"BASE_VOLUME": str(vol), "FTW_ALLOWED_PATHS": str(extra)}
    return env, vol, extra, outside


def config_with_path(path):
    return {"base_model": "org/model", "learning_rate": 1e-4, "datasets": [{"path": path, "type": "alpaca"}]}


def test_paths_inside_are_allowed(roots):
    env, vol, extra, _ = roots
    for value in (
        str(vol / "data" / "train.jsonl"),
        "./data/train.jsonl",
        "data/train.jsonl",
        f"file://{vol}/data",
        str(vol / "link-in" / "train.jsonl"),
        str(extra),
        f"{extra}/sub/not-yet-there",
        "org/dataset",
        "s3://b/k",
        "https://h.example.com/x.jsonl",
    ):
        assert check_local_path(value, env) is None, value
        assert validate_config(config_with_path(value), env).valid, value


def test_relative_paths_are_read_under_base_volume_not_the_cwd(roots, monkeypatch, tmp_path):
    env, vol, _, _ = roots
    monkeypatch.chdir(tmp_path)
    assert resolve_local_path("./data/train.jsonl", env) == vol / "data" / "train.jsonl"


@pytest.mark.parametrize(
    "make_value, fragment",
    [
        (lambda vol, out: str(vol / "link-out" / "passwd"), "outside the allowed folders"),
        (lambda vol, out: str(vol / "link-out"), "outside the allowed folders"),
        (lambda vol, out: str(vol / "data" / "p.jsonl"), "outside the allowed folders"),
        (lambda vol, out: "./link-out/passwd", "outside the allowed folders"),
        (lambda vol, out: f"file://{vol}/link-out/passwd", "outside the allowed folders"),
        (lambda vol, out: str(out / "passwd"), "outside the allowed folders"),
        (lambda vol, out: "/etc/passwd", "outside the allowed folders"),
        (lambda vol, out: "file:///etc/passwd", "outside the allowed folders"),
        (lambda vol, out: "~/.ssh/id_rsa", "outside the allowed folders"),
        (lambda vol, out: "~root", "outside the allowed folders"),
        (lambda vol, out: f"{vol}/../secret/passwd", "'..'"),
        (lambda vol, out: f"{vol}/data/../../secret", "'..'"),
        (lambda vol, out: "../secret/passwd", "'..'"),
        (lambda vol, out: "./data/../../secret", "'..'"),
        (lambda vol, out: "org/../../secret", "'..'"),
        (lambda vol, out: "data\\..\\..\\secret", "'..'"),
        (lambda vol, out: f"file://{vol}/%2e%2e/secret", "%-escapes"),
        (lambda vol, out: "file://evil.host/share/x", "names a host"),
        (lambda vol, out: f"{vol}/data/train.jsonl\x00.txt", "NUL"),
    ],
)
def test_escapes_are_refused(roots, make_value, fragment):
    env, vol, _, outside = roots
    value = make_value(vol, outside)
    problem = check_local_path(value, env)
    assert problem is not None and fragment in problem, (value, problem)
    report = validate_config(config_with_path(value), env)
    assert "datasets[0].path" in {i.loc for i in report.errors}


def test_every_path_key_is_checked(roots):
    env, _, _, outside = roots
    bad = str(outside)
    raw = {
        "base_model": bad,
        "tokenizer_config": bad,
        "base_model_config": bad,
        "lora_model_dir": bad,
        "adapter": "lora",
        "dataset_prepared_path": bad,
        "resume_from_checkpoint": bad,
        "learning_rate": 1e-4,
        "datasets": [{"path": "org/d", "type": "alpaca", "data_files": [bad, "ok.jsonl"]}],
        "test_datasets": [{"path": bad, "type": "alpaca"}],
        "pretraining_dataset": [{"path": bad}],
    }
    found = {i.loc for i in validate_config(raw, env).errors}
    assert found == {
        "base_model",
        "tokenizer_config",
        "base_model_config",
        "lora_model_dir",
        "dataset_prepared_path",
        "resume_from_checkpoint",
        "datasets[0].data_files[0]",
        "test_datasets[0].path",
        "pretraining_dataset[0].path",
    }


def test_operator_can_allow_a_folder(roots):
    env, _, _, outside = roots
    assert check_local_path(str(outside / "passwd"), env) is not None
    allowed = {**env, "FTW_ALLOWED_PATHS": os.pathsep.join([env["FTW_ALLOWED_PATHS"], str(outside)])}
    assert check_local_path(str(outside / "passwd"), allowed) is None


def test_a_symlink_loop_is_an_error_not_a_crash(roots):
    env, vol, _, _ = roots
    os.symlink(vol / "loop-b", vol / "loop-a")
    os.symlink(vol / "loop-a", vol / "loop-b")
    problem = check_local_path(str(vol / "loop-a" / "x"), env)
    assert problem is not None


def test_overlong_path_is_an_error_not_a_crash(roots):
    env, vol, _, _ = roots
    check_local_path(str(vol / ("x" * 5000)), env)  # one name longer than the filesystem allows: no exception
    report = validate_config(config_with_path("/" + "y" * 100_000), env)
    assert not report.valid

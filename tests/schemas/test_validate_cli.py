"""`ftw validate` as users script it: exit codes and the --json shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import child_env

GOOD = {
    "base_model": "org/model",
    "learning_rate": 2e-4,
    "adapter": "lora",
    "datasets": [{"path": "org/data", "type": "alpaca"}],
}


def run_validate(path, *flags):
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "validate", str(path), *flags],
        capture_output=True,
        text=True,
        env=child_env(),
    )


def test_valid_config_exits_0(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(GOOD))
    r = run_validate(p, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"valid": True, "errors": [], "warnings": []}


def test_every_error_reported_at_once_with_locations(tmp_path):
    bad = {
        **GOOD,
        "learning_rate": -1,
        "datasets": [{"path": "x", "type": "sharegpt"}],
        "lora_rr": 4,
        "plugins": ["evil.mod"],
    }
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(bad))
    r = run_validate(p, "--json")
    assert r.returncode == 3
    report = json.loads(r.stdout)
    locs = {e["loc"] for e in report["errors"]}
    assert {"learning_rate", "datasets[0].type", "plugins"} <= locs
    assert any("did you mean 'lora_r'" in w["msg"] for w in report["warnings"])


def test_job_json_with_bad_run_id(tmp_path):
    p = tmp_path / "job.json"
    p.write_text(json.dumps({"input": {"run_id": "../escape", "args": GOOD}}))
    r = run_validate(p, "--json")
    assert r.returncode == 3
    assert [e["loc"] for e in json.loads(r.stdout)["errors"]] == ["run_id"]


def test_usage_errors_exit_2(tmp_path):
    assert run_validate(tmp_path / "missing.yml").returncode == 2
    p = tmp_path / "broken.yml"
    p.write_text("a: [unclosed")
    assert run_validate(p).returncode == 2


@pytest.mark.parametrize("name, doc", [("c.yml", GOOD), ("job.json", {"input": {"run_id": "r", "args": GOOD}})])
def test_validate_imports_no_torch(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    code = (
        "import sys; from worker.cli import main; rc = main(['validate', sys.argv[1]]); "
        "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
        "print('HEAVY', bad); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


FTW = Path(sys.executable).parent / "ftw"  # the console script `make setup` installs


def test_console_script_text_report(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump({**GOOD, "adapter": "qlora", "lora_rr": 4}))
    r = subprocess.run([str(FTW), "validate", str(p)], capture_output=True, text=True, env=child_env())
    assert r.returncode == 3
    lines = r.stdout.splitlines()
    assert lines[0] == "error   adapter: adapter: qlora needs load_in_4bit: true"
    assert lines[1].startswith("warning lora_rr: unknown key 'lora_rr' is ignored; did you mean 'lora_r'?")
    assert lines[-1] == "invalid: 1 error(s)"


def test_job_shapes_are_recognised(tmp_path):
    for name, doc in [
        ("wrapped.json", {"input": {"run_id": "r1", "args": GOOD}}),
        ("bare.json", {"run_id": "r1", "config": GOOD}),
        ("job.yml", {"input": {"run_id": "r1", "config": GOOD}}),
    ]:
        p = tmp_path / name
        p.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
        r = run_validate(p, "--json")
        assert (r.returncode, json.loads(r.stdout)["valid"]) == (0, True), (name, r.stdout)


def test_environment_reaches_the_cli(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump({**GOOD, "trust_remote_code": True}))
    assert run_validate(p).returncode == 3
    r = subprocess.run(
        [sys.executable, "-m", "worker.cli", "validate", str(p)],
        capture_output=True,
        text=True,
        env=child_env(FTW_ALLOW_REMOTE_CODE="1"),
    )
    assert r.returncode == 0, r.stdout


def test_empty_and_non_document_files_are_usage_errors(tmp_path):
    empty, bad_json, folder = tmp_path / "e.yml", tmp_path / "b.json", tmp_path / "dir.yml"
    empty.write_text("\n")
    bad_json.write_text("{'single': 'quotes'}")
    folder.mkdir()
    for p in (empty, bad_json, folder):
        r = run_validate(p)
        assert r.returncode == 2 and "ftw validate:" in r.stderr, (p, r.stderr)


def test_a_document_that_is_not_a_mapping_is_invalid_not_a_crash(tmp_path):
    p = tmp_path / "list.yml"
    p.write_text("- a\n- b\n")
    r = run_validate(p, "--json")
    assert r.returncode == 3
    assert json.loads(r.stdout)["errors"][0]["msg"].startswith("a training config must be a mapping")


def test_usage(tmp_path):
    assert run_validate("--help").returncode == 0
    r = subprocess.run(
        [sys.executable, "-m", "worker.cli", "validate"], capture_output=True, text=True, env=child_env()
    )
    assert r.returncode == 2


def test_credential_errors_in_json_output_name_keys_not_values(tmp_path):
    p = tmp_path / "job.json"
    p.write_text(
        json.dumps(
            {
                "input": {
                    "run_id": "r1",
                    "args": GOOD,
                    "credentials": {"hf_token": ["hf_CLIsecretVALUE1"], "openai_key": "sk-CLIsecretVALUE2"},
                }
            }
        )
    )
    for flags in (["--json"], []):
        r = run_validate(p, *flags)
        assert r.returncode == 3, r.stderr
        assert "credentials.hf_token" in r.stdout and "credentials.openai_key" in r.stdout
        assert "CLIsecretVALUE" not in r.stdout + r.stderr

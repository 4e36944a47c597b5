"""`ftw validate` as users script it: exit codes and the --json shape."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import child_env

GOOD = {"base_model": "org/model", "learning_rate": 2e-4, "adapter": "lora", "datasets": [{"path": "org/data", "type": "alpaca"}]}


def run_validate(path, *flags):
    return subprocess.run([sys.executable, "-m", "worker.cli", "validate", str(path), *flags], capture_output=True, text=True, env=child_env())


def test_valid_config_exits_0(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(GOOD))
    r = run_validate(p, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"valid": True, "errors": [], "warnings": []}


def test_every_error_reported_at_once_with_locations(tmp_path):
    bad = {**GOOD, "learning_rate": -1, "datasets": [{"path": "x", "type": "sharegpt"}], "lora_rr": 4, "plugins": ["evil.mod"]}
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


def test_validate_imports_no_torch(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(GOOD))
    code = (
        "import sys; from worker.cli import main; rc = main(['validate', sys.argv[1]]); "
        "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
        "print('HEAVY', bad); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout

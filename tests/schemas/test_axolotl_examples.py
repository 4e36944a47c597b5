"""Every real axolotl example config: it validates, or fails only on features ftw names as unsupported or gated.

The examples are axolotl's own (tests/schemas/axolotl_examples, unmodified). The committed
table docs/config-compat.md must match what scripts/config_compat.py generates from them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schemas.config import TrainingConfig
from schemas.validate import validate_config
from tests.conftest import REPO, child_env

EXAMPLES = Path(__file__).parent / "axolotl_examples"
FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yml", ".yaml"))
FRESH_ENDPOINT = {"BASE_VOLUME": "/volume"}
# keys in axolotl's examples that are not axolotl keys at all (axolotl drops them silently)
STRAY_KEYS = {"eta_min", "full_finetune"}


def named_key(loc: str) -> str:
    """`datasets[0].field_chosen` -> `field_chosen`; `liger_rope` -> `liger_rope`."""
    return loc.split(".")[-1].split("[")[0]


def test_the_examples_are_there():
    assert len(FILES) == 131


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(EXAMPLES)) for p in FILES])
def test_example_validates_or_names_what_is_unsupported(path):
    raw = yaml.safe_load(path.read_text())
    report = validate_config(raw, FRESH_ENDPOINT)
    if report.valid:
        assert isinstance(report.value, TrainingConfig)
        assert report.value.base_model == raw["base_model"]
        assert TrainingConfig.model_validate_json(report.value.model_dump_json()) == report.value  # the children's copy
    for issue in report.errors:
        assert issue.kind in ("unsupported", "gated"), f"{path.name}: a real axolotl config hit {issue}"
        key = named_key(issue.loc)
        assert key in issue.msg or (issue.kind == "gated" and "FTW_ALLOWED_PATHS" in issue.msg), issue
        assert "not supported" in issue.msg or "refused" in issue.msg or "outside the allowed" in issue.msg, issue
    unknown = {w.loc for w in report.warnings if w.msg.startswith("unknown")}
    assert unknown <= STRAY_KEYS, f"{path.name}: axolotl keys ftw does not classify: {unknown - STRAY_KEYS}"


def test_dpo_examples_validate_and_other_rl_methods_are_named():
    rl_files = {p.name: yaml.safe_load(p.read_text()) for p in FILES if (yaml.safe_load(p.read_text()) or {}).get("rl")}
    assert len(rl_files) >= 5
    for name, raw in rl_files.items():
        report = validate_config(raw, FRESH_ENDPOINT)
        if raw["rl"] == "dpo" and not raw.get("plugins"):
            assert report.valid, (name, report.errors)
        elif raw["rl"] == "gdpo":
            rl_error = next(i for i in report.errors if i.loc == "rl")
            assert rl_error.kind == "unsupported" and f"rl: {raw['rl']}" in rl_error.msg
            assert not any(i.loc.startswith("datasets") for i in report.errors), (name, report.errors)
        elif raw["rl"] == "ebft":  # strided validates (bar torch_compile, which strided refuses); async is named
            assert not any(i.loc.startswith(("datasets", "ebft")) for i in report.errors), (name, report.errors)
            if (raw.get("ebft") or {}).get("mode") == "strided":
                assert {i.loc for i in report.errors} <= {"torch_compile"}, (name, report.errors)
            else:
                assert any(i.loc == "trl.async_prefetch" for i in report.errors) or not raw["trl"].get("async_prefetch")


def test_compat_doc_is_up_to_date():
    r = subprocess.run(
        [sys.executable, "scripts/config_compat.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert r.returncode == 0, r.stderr


def test_compat_doc_counts_match_the_files():
    text = (REPO / "docs" / "config-compat.md").read_text()
    rows = [
        line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 5 and "outcome" not in line
    ]
    assert len(rows) == len(FILES)
    valid = sum(1 for p in FILES if validate_config(yaml.safe_load(p.read_text()), FRESH_ENDPOINT).valid)
    assert f"| valid | {valid} |" in text


def test_every_key_of_axolotls_schema_is_classified():
    """axolotl_*_keys.txt: the field names of axolotl's config model and of its SFT dataset entries at commit
    067b021c (src/axolotl/utils/schemas/*.py). None may fall through to 'unknown key'."""
    config_keys = (Path(__file__).parent / "axolotl_config_keys.txt").read_text().split()
    dataset_keys = (Path(__file__).parent / "axolotl_dataset_keys.txt").read_text().split()
    assert len(config_keys) > 350 and len(dataset_keys) > 30, "the key lists are axolotl's, not a sample"
    report = validate_config({k: True for k in config_keys}, FRESH_ENDPOINT)
    assert not [w for w in report.warnings if w.msg.startswith("unknown")]
    report = validate_config(
        {"base_model": "org/m", "learning_rate": 1e-4, "datasets": [{k: "x" for k in dataset_keys}]}, FRESH_ENDPOINT
    )
    assert not [w for w in report.warnings if w.msg.startswith("unknown")]

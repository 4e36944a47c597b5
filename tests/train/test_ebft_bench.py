"""bench/ebft.py's axolotl arm on the CPU at the tiny shape: axolotl 0.18.0's strided EBFT trainer (axolotl, addict
and trl 1.8.0 of .venv-axolotl: what the GPU run installs from .whl-ebft) runs in its own process beside ftw's
packages, with ftw's arm's settings, and the bench reports a row per arm and document length; an arm that cannot
run is a row saying why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, child_env
from tests.parity.harness import AXOLOTL_PYTHON, site_packages_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def axolotl_site(tmp_path: Path) -> Path:
    """axolotl, addict and trl (with their dist-info) of .venv-axolotl, linked into one folder."""
    if not AXOLOTL_PYTHON.exists():
        raise FileNotFoundError(f"{AXOLOTL_PYTHON} is missing: build it with `make axolotl-env`")
    site = tmp_path / "axolotl-site"
    site.mkdir()
    for package in ("axolotl", "addict", "trl"):
        where = site_packages_dir(AXOLOTL_PYTHON, package)
        (site / package).symlink_to(where)
        for dist in where.parent.glob(f"{package}-*.dist-info"):
            (site / dist.name).symlink_to(dist)
    return site


def tiny_run(tmp_path: Path, arms: str, axolotl_site: Path, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """bench/ebft.py's tiny CPU run of `arms`: the rows of the JSON it writes and its table (it must exit 0)."""
    out = tmp_path / "ebft.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/ebft.py",
            "--tiny",
            "--arms",
            arms,
            "--axolotl-site",
            str(axolotl_site),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["rows"], proc.stdout


def test_the_axolotl_arm_runs_axolotls_trainer_with_ftws_settings(axolotl_site: Path, tmp_path: Path):
    from bench.ebft import EBFT
    from bench.models import SHAPES
    from schemas.rl import EbftConfig
    from worker.train.ebft import layer_indices

    rows, table_text = tiny_run(tmp_path, "dense,axolotl", axolotl_site, timeout=580)
    assert [(r["path"], r["doc_len"]) for r in rows] == [("dense", 48), ("axolotl", 48), ("dense", 96), ("axolotl", 96)]
    assert all("error" not in r and r["doc_tokens_per_s"] > 0 for r in rows), rows
    ftw = EbftConfig(**EBFT)
    want = {
        "stride": ftw.stride,
        "context_length": ftw.context_length,
        "generate_max_len": ftw.generate_max_len,
        "n_samples": ftw.n_samples_per_prompt,
        "temperature": ftw.temperature,
        "top_p": ftw.top_p,
        "embed_method": ftw.embed_method,
        "use_whitening": ftw.use_whitening,
        "alignment_coef": ftw.alignment_coef,
        "diversity_coef": ftw.diversity(None),
        "rl_coef": ftw.rl_coef,
        "ce_coef": ftw.ce_coef,
        "advantage_estimator": ftw.estimator(None),
        "min_completion_prefix": ftw.min_completion_prefix,
        "feature_layers": layer_indices(ftw.feature_layers, SHAPES["tiny"]["num_hidden_layers"]),
        "flex_attention": False,  # the CPU: axolotl's dense masks, as ftw's dense arm
    }
    for r in rows[1::2]:
        assert r["axolotl"] == "0.18.0" and r["numba"] in ("stand-in", "installed")
        assert r["settings"] == want
    table = [line.split() for line in table_text.splitlines() if line.startswith(("dense ", "axolotl "))]
    assert [t[:2] for t in table] == [["dense", "48"], ["axolotl", "48"], ["dense", "96"], ["axolotl", "96"]]


def test_an_axolotl_arm_that_cannot_run_is_a_row_saying_why(tmp_path: Path):
    empty = tmp_path / "no-axolotl"
    empty.mkdir()
    rows, _ = tiny_run(tmp_path, "axolotl", empty, timeout=300)
    assert [(r["path"], r["doc_len"]) for r in rows] == [("axolotl", 48), ("axolotl", 96)]
    assert all(r["error"] == "failed: ModuleNotFoundError: No module named 'axolotl'" for r in rows), rows

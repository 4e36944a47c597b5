"""ftw's input_ids and labels against axolotl's own prompt strategies, row by row, for every case of
tests/parity/cases.py. Identical, or the deliberate difference docs/config-compat.md explains
(checked to be still there, so the docs stay true)."""

from __future__ import annotations

import pytest

from tests.parity import conftest
from tests.parity.cases import CASES, Case
from tests.parity.harness import AXOLOTL_PYTHON, VENV_AXOLOTL, Outcome, run_all

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(
        not (VENV_AXOLOTL / ".installed").exists(),
        reason=(
            f"axolotl's reference venv {VENV_AXOLOTL} is not built "
            "(`make axolotl-env`; `make test` and `make parity` build it)"
        ),
    ),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Outcome]:
    assert AXOLOTL_PYTHON.exists()
    conftest.RESULTS.update(run_all(tmp_path_factory.mktemp("parity")))
    return conftest.RESULTS


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_tokens_as_axolotl(results, case: Case):
    outcome = results[case.name]
    assert "error" not in outcome.axolotl, outcome.axolotl.get("trace", outcome.axolotl)
    if case.deliberate:
        assert not outcome.same_labels, (
            f"the documented difference ({case.deliberate}) is gone: update docs/config-compat.md and the case"
        )
    else:
        assert "error" not in outcome.ftw, outcome.ftw
        assert outcome.same_ids and outcome.same_labels, outcome.first_difference()

"""With FTW_PARITY_TABLE=1 (`make parity`), the session ends with the table of docs/parity.md."""

from __future__ import annotations

import os

RESULTS: dict = {}  # filled by test_parity's fixture


def pytest_terminal_summary(terminalreporter):
    if RESULTS and os.environ.get("FTW_PARITY_TABLE") == "1":
        from tests.parity.harness import table

        terminalreporter.write_sep("-", "ftw vs axolotl: identical input_ids / labels")
        terminalreporter.write_line(table(RESULTS))

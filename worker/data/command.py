"""`ftw preprocess CONFIG`'s body: prepare (tokenise, mask, pack, cache) the datasets of a config.

Validates the config first (invalid as `ftw validate` says), then runs the same pipeline as the
preprocess child. Prints a summary table, and the summary as JSON on the last stdout line; a
failure names the file, row and field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from worker.errors import FtwError, Outcome


def preprocess_file(path: Path) -> Outcome:
    from worker.documents import config_from_file

    cfg, outcome = config_from_file(path, "ftw preprocess")
    if cfg is None:
        return outcome
    from worker.data.pipeline import prepare, summary_table

    try:
        summary = prepare(cfg)
    except FtwError as e:
        print(f"ftw preprocess: {e.code}: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return "failed"
    print(summary_table(summary))
    print(json.dumps(summary, separators=(",", ":")))
    return "ok"

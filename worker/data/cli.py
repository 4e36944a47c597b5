"""`ftw preprocess CONFIG`: prepare (tokenise, mask, pack, cache) the datasets of a training config.

Validates the config first (exit 3 when invalid, like `ftw validate`), then runs the same
pipeline as the preprocess child. Prints a summary table, and the summary as JSON on the last
stdout line. Exit 0 done, 1 when the data or the config cannot be prepared (the message names the
file, row and field), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worker.errors import FtwError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # an invalid config exits as `ftw validate` does (3)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftw preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="training config, YAML or JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    from worker.validate_cli import config_from_file

    cfg, code = config_from_file(args.config, "ftw preprocess")
    if cfg is None:
        return code
    from worker.data.pipeline import prepare, summary_table

    try:
        summary = prepare(cfg)
    except FtwError as e:
        print(f"ftw preprocess: {e.code}: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return EXIT_FAILED
    print(summary_table(summary))
    print(json.dumps(summary, separators=(",", ":")))
    return EXIT_OK

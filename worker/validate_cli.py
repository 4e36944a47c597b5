"""`ftw validate PATH [--json]`: a training config (YAML/JSON) or a job JSON, every problem at once.

Exit 0 when valid (warnings allowed), 3 when invalid, 2 on usage errors (unreadable file, bad
YAML). Imports neither torch nor transformers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas.issues import Report
from schemas.job import validate_job
from schemas.validate import validate_config

EXIT_VALID, EXIT_USAGE, EXIT_INVALID = 0, 2, 3


def load_document(path: Path) -> Any:
    """YAML is a superset of JSON, but JSON files get the faster, stricter parser."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text)


def looks_like_job(doc: Any) -> bool:
    return isinstance(doc, dict) and ("input" in doc or "config" in doc or "args" in doc)


def validate_document(doc: Any) -> Report:
    return validate_job(doc) if looks_like_job(doc) else validate_config(doc)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftw validate", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_VALID
    try:
        doc = load_document(args.path)
    except (OSError, UnicodeDecodeError) as e:
        print(f"ftw validate: cannot read {args.path}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: the file is not a document
        print(f"ftw validate: {args.path} is not valid YAML/JSON: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = validate_document(doc)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for issue in report.errors:
            print(f"error   {issue}")
        for issue in report.warnings:
            print(f"warning {issue}")
        print("valid" if report.valid else f"invalid: {len(report.errors)} error(s)")
    return EXIT_VALID if report.valid else EXIT_INVALID

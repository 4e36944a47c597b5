"""Config and job files as every command reads them, and `ftw validate PATH [--json]`'s body: a
training config (YAML/JSON) or a job JSON, every problem at once.

    ftw validate config.yml            # axolotl YAML
    ftw validate job.json --json       # {"input": {...}} or the bare input; machine-readable report

Valid (warnings allowed), invalid, or a usage error (unreadable file, bad YAML/JSON). Validation
uses this process's environment, as the endpoint would: BASE_VOLUME,
FTW_ALLOWED_PATHS, FTW_ALLOW_*, FTW_CONFIG_DEFAULTS/OVERRIDES (docs/config.md). Imports only
pydantic and yaml (never torch or transformers), so it answers in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from schemas.issues import Report
from worker.errors import Outcome


def load_document(path: Path) -> Any:
    """YAML is a superset of JSON, but JSON files get the faster, stricter parser; both within the
    limits of schemas.limits (size, depth, alias expansion), so no file can crash or stall them."""
    from schemas.limits import MAX_DOCUMENT_BYTES, DocumentError, parse_json, parse_yaml

    with path.open("rb") as f:
        data = f.read(MAX_DOCUMENT_BYTES + 1)
    if not data.strip():
        raise DocumentError(f"{path} is empty")
    return (parse_json if path.suffix == ".json" else parse_yaml)(data, str(path))


def read_document(path: Path, prog: str) -> tuple[Any, bool]:
    """(document, True), or (None, False) after saying on stderr why the file cannot be read:
    the usage-error path every command that takes a config or job file shares."""
    from schemas.limits import DocumentError

    try:
        return load_document(path), True
    except OSError as e:
        print(f"{prog}: cannot read {path}: {e.strerror or e}", file=sys.stderr)
    except DocumentError as e:
        print(f"{prog}: {e}", file=sys.stderr)
    return None, False


def config_from_file(path: Path, prog: str, honours: frozenset[str] = frozenset()) -> tuple[Any, Outcome]:
    """(TrainingConfig, "ok") for a readable, valid config file; else (None, why) after printing
    why on stderr: the shared front door of `ftw preprocess` and `ftw train`. `honours`: keys that
    ftw decides for jobs (schemas.classify.FTW_DECIDES) but this command takes from the config, so
    their "set by ftw" warning would be false here."""
    from schemas.secrets import CONFIG_SECRETS_ENV, restore_masked
    from schemas.validate import validate_config

    doc, readable = read_document(path, prog)
    if not readable:
        return None, "usage"
    report = validate_config(restore_masked(doc, os.environ.get(CONFIG_SECRETS_ENV)))
    for issue in report.warnings:
        if issue.loc not in honours:
            print(f"warning {issue}", file=sys.stderr)
    for issue in report.errors:
        print(f"error   {issue}", file=sys.stderr)
    return (report.value, "ok") if report.valid else (None, "invalid")


def looks_like_job(doc: Any) -> bool:
    return isinstance(doc, dict) and ("input" in doc or "config" in doc or "args" in doc)


def validate_document(doc: Any) -> Report:
    if looks_like_job(doc):
        from schemas.job import validate_job  # builds the job models only when they are needed

        return validate_job(doc)
    from schemas.validate import validate_config

    return validate_config(doc)


def validate_file(path: Path, as_json: bool) -> Outcome:
    """`ftw validate`: every problem of the file, as text or as the --json report."""
    doc, readable = read_document(path, "ftw validate")
    if not readable:
        return "usage"
    report = validate_document(doc)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for issue in report.errors:
            print(f"error   {issue}")
        for issue in report.warnings:
            print(f"warning {issue}")
        print("valid" if report.valid else f"invalid: {len(report.errors)} error(s)")
    return "ok" if report.valid else "invalid"

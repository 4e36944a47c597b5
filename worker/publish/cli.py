"""`ftw pull SOURCE [DIR] [--kind adapter|merged|model|logs] [--json]`: a published artifact, verified.

SOURCE is a run id (the local store, else the bucket in BUCKET_NAME), s3://bucket/prefix/…,
hf://org/name@revision (or org/name@revision) or a local folder. Without DIR the verified copy
stays in the cache (BASE_VOLUME/cache/adapters/<manifest sha256>) and its path is printed.
Exit 0 done, 1 failed (the message says what to change), 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from worker.errors import PublishError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftw pull", description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("dest", nargs="?", type=Path)
    parser.add_argument("--kind", default="adapter", choices=["adapter", "merged", "model", "logs"])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    try:
        args = parser.parse_intermixed_args(argv)  # options before or after the positionals
    except SystemExit as e:
        return 2 if e.code else 0
    from worker.publish.pull import pull

    try:
        pulled = pull(args.source, os.environ, dest=args.dest, kind=args.kind)
    except PublishError as e:
        print(f"ftw pull: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        if args.json:
            print(json.dumps(e.as_result()))
        return 1
    record = {"path": str(pulled.path), "source": pulled.source, "sha256_manifest": pulled.manifest_sha256, "cached": pulled.cached}
    print(json.dumps(record) if args.json else pulled.path)
    return 0

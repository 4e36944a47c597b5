"""`ftw pull SOURCE [DIR] [--kind adapter|merged|model|logs] [--json]`: a published artifact, verified.

SOURCE is a run id (the local store, else the bucket in BUCKET_NAME), s3://bucket/prefix/…,
hf://org/name@revision (or org/name@revision) or a local folder. With DIR the artifact is copied
there (DIR absent or empty; a DIR that already holds exactly this artifact is left as it is, so a
repeated pull succeeds). Without DIR nothing is copied: a remote artifact stays in the cache
(BASE_VOLUME/cache/adapters/<manifest sha256>), a local one where it is; either way the verified
folder's path is printed. Exit 0 done, 1 failed (the message says what to change), 2 usage error,
130 interrupted (Ctrl-C or SIGTERM: a partial download is removed, DIR is left as it was).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from worker.errors import FtwError


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ftw pull", description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="run id, s3://…, hf://org/name@revision, org/name@revision or a local folder")
    parser.add_argument(
        "dest",
        nargs="?",
        type=Path,
        metavar="DIR",
        help="copy the artifact into this folder (default: none; the cached or local folder's path is printed)",
    )
    parser.add_argument("--kind", default="adapter", choices=["adapter", "merged", "model", "logs"])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    try:
        args = parser.parse_intermixed_args(argv)  # options before or after the positionals
    except SystemExit as e:
        return 2 if e.code else 0
    from worker.publish.pull import pull

    signal.signal(signal.SIGTERM, interrupted)  # as Ctrl-C: the partial download's folder is removed on the way out
    try:
        pulled = pull(args.source, os.environ, dest=args.dest, kind=args.kind)
    except KeyboardInterrupt:
        print("ftw pull: interrupted; nothing was copied into DIR (run it again to finish)", file=sys.stderr)
        return 130
    except FtwError as e:
        print(f"ftw pull: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        if args.json:
            print(json.dumps(e.as_result()))
        return 1
    record = {
        "path": str(pulled.path),
        "source": pulled.source,
        "sha256_manifest": pulled.manifest_sha256,
        "cached": pulled.cached,
    }
    print(json.dumps(record) if args.json else pulled.path)
    return 0

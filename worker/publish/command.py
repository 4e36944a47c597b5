"""`ftw pull SOURCE [DIR] [--kind adapter|merged|model|logs] [--json]`'s body: a published artifact, verified.

SOURCE is a run id (the local store, else the bucket in BUCKET_NAME), s3://bucket/prefix/…,
hf://org/name@revision (or org/name@revision) or a local folder. With DIR the artifact is copied
there (DIR absent or empty; a DIR that already holds exactly this artifact is left as it is, so a
repeated pull succeeds). Without DIR nothing is copied: a remote artifact stays in the cache
(BASE_VOLUME/cache/adapters/<manifest sha256>), a local one where it is; either way the verified
folder's path is printed. Done, failed (the message says what to change), or interrupted (Ctrl-C
or SIGTERM: a partial download is removed, DIR is left as it was).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from worker.errors import FtwError, Outcome


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def pull_artifact(source: str, dest: Path | None, kind: str, as_json: bool) -> Outcome:
    from worker.publish.pull import pull

    signal.signal(signal.SIGTERM, interrupted)  # as Ctrl-C: the partial download's folder is removed on the way out
    try:
        pulled = pull(source, os.environ, dest=dest, kind=kind)
    except KeyboardInterrupt:
        print("ftw pull: interrupted; nothing was copied into DIR (run it again to finish)", file=sys.stderr)
        return "interrupted"
    except FtwError as e:
        print(f"ftw pull: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        if as_json:
            print(json.dumps(e.as_result()))
        return "failed"
    record = {
        "path": str(pulled.path),
        "source": pulled.source,
        "sha256_manifest": pulled.manifest_sha256,
        "cached": pulled.cached,
    }
    print(json.dumps(record) if as_json else pulled.path)
    return "ok"

"""Upload/download throughput of ftw's S3 publish and pull against a plain boto3 copy, same run.

    .venv/bin/python bench/publish.py [--size-mb 1024] [--part-mb 64] [--concurrency 8] [--repeat 1]

Starts `rclone serve s3` on loopback (tests/s3server.py), writes one random checkpoint-sized file,
and times, alternately:
- baseline upload: boto3 `upload_file` with its default TransferConfig (what `aws s3 cp` does);
- ftw upload: `upload_folder` (sha256 manifest, parallel multipart, size check, manifest last);
- baseline download: boto3 `download_file` with its defaults;
- ftw download: `pull` of the S3 URI (manifest first, parallel ranged GETs, sha256 verification,
  rename into the content-addressed cache).
Prints a table of MiB/s per side and the ratio ftw / baseline (> 1: ftw faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.s3server import running_s3_server  # noqa: E402
from worker.publish.pull import pull  # noqa: E402
from worker.publish.s3 import S3Location, S3Settings, make_client, upload_folder  # noqa: E402
from worker.publish.transfer import TransferSettings  # noqa: E402

MiB = 1024 * 1024


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
        f.write(os.urandom(size % (16 * MiB)))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--part-mb", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    size = args.size_mb * MiB
    with (
        tempfile.TemporaryDirectory(prefix="ftw-bench-publish-") as tmp_name,
        running_s3_server(Path(tmp_name) / "s3") as server,
    ):
        tmp = Path(tmp_name)
        server.make_bucket("bench")
        src = tmp / "checkpoint"
        src.mkdir()
        write_random(src / "model.safetensors", size)
        env = {
            **server.env(),
            "BASE_VOLUME": str(tmp / "volume"),
            "FTW_S3_PART_MB": str(args.part_mb),
            "FTW_S3_CONCURRENCY": str(args.concurrency),
        }
        transfer = TransferSettings.from_env(env)
        client = make_client(S3Settings.from_env(env), transfer)
        baseline_client = server.client()
        results: dict[str, list[float]] = {k: [] for k in ("base_up", "ftw_up", "base_down", "ftw_down")}
        for i in range(args.repeat):
            key = f"plain{i}/model.safetensors"
            results["base_up"].append(
                timed(partial(baseline_client.upload_file, str(src / "model.safetensors"), "bench", key))
            )
            loc = S3Location("bench", f"ftw{i}")
            results["ftw_up"].append(timed(partial(upload_folder, client, src, loc, transfer)))
            out = tmp / f"plain-{i}.bin"
            results["base_down"].append(timed(partial(baseline_client.download_file, "bench", key, str(out))))
            out.unlink()
            results["ftw_down"].append(timed(partial(pull, loc.uri, env)))
            shutil.rmtree(tmp / "volume" / "cache")
    best = {k: min(v) for k, v in results.items()}
    print(
        f"\nsize {args.size_mb} MiB, part {args.part_mb} MiB, concurrency {args.concurrency}, best of {args.repeat}\n"
    )
    print("| transfer | boto3 plain (MiB/s) | ftw (MiB/s) | ftw / plain |")
    print("|---|---:|---:|---:|")
    for name, base, ours in (("upload", "base_up", "ftw_up"), ("download", "base_down", "ftw_down")):
        b, o = args.size_mb / best[base], args.size_mb / best[ours]
        print(f"| {name} | {b:.1f} | {o:.1f} | {o / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

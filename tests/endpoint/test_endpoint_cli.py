"""`ftw endpoint` as a user starts it: refusals without a key, and `--worker` running a handler."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from tests.conftest import REPO, child_env, wait_gone
from tests.endpoint.conftest import API_KEY, PROTOCOL_HANDLER, Api
from worker.devtools.endpoint.local import LocalEndpoint


def ftw_endpoint(tmp_path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "endpoint", "--port", "0", "--db", str(tmp_path / "e.sqlite3"), *args],
        env=child_env(**env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_no_key_or_no_handler_is_a_usage_error(tmp_path):
    no_key = ftw_endpoint(tmp_path)
    assert no_key.wait(timeout=60) == 2 and "set FTW_ENDPOINT_API_KEY" in no_key.stderr.read()
    no_handler = ftw_endpoint(tmp_path, "--worker", str(tmp_path / "missing.py"), FTW_ENDPOINT_API_KEY=API_KEY)
    assert no_handler.wait(timeout=60) == 2 and "no handler file" in no_handler.stderr.read()


def test_worker_flag_runs_a_handler_and_sigterm_stops_both(tmp_path):
    proc = ftw_endpoint(tmp_path, "--worker", str(PROTOCOL_HANDLER), FTW_ENDPOINT_API_KEY=API_KEY)
    try:
        url = proc.stdout.readline().strip().rsplit(" ", 1)[1]
        while not (found := re.search(r"^  worker local-\w+: python .* \(pid (\d+)\)", proc.stdout.readline())):
            pass
        worker_pid = int(found[1])
        endpoint = LocalEndpoint(tmp_path / "e.sqlite3", API_KEY, port=int(url.rsplit(":", 1)[1]))
        api = Api(endpoint)
        assert api.wait(api.run({"steps": 2, "echo": "cli"}))["output"][-1] == {"result": {"echo": "cli", "s3": False}}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert wait_gone(worker_pid, timeout=15)
    finally:
        proc.kill()


def test_a_parent_killed_with_sigkill_leaves_no_endpoint_or_worker_behind(tmp_path):
    script = (
        "import sys, time\n"
        "from worker.devtools.endpoint.local import LocalEndpoint\n"
        f"e = LocalEndpoint({str(tmp_path / 'o.sqlite3')!r}, 'k').start()\n"
        f"w = e.start_worker({str(PROTOCOL_HANDLER)!r})\n"
        "print(e.proc.pid, w.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], env=child_env(), cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        endpoint_pid, worker_pid = map(int, parent.stdout.readline().split())
        parent.kill()
        parent.wait(timeout=10)
        assert wait_gone(endpoint_pid, timeout=15) and wait_gone(worker_pid, timeout=15)
    finally:
        parent.kill()


def test_worker_tokens_come_from_the_worker_key_and_the_two_keys_must_differ(tmp_path):
    from worker.devtools.endpoint.server import worker_token

    token = subprocess.run(
        [sys.executable, "-m", "worker.cli", "endpoint", "--worker-token", "gpu-7"],
        cwd=REPO,
        env=child_env(FTW_ENDPOINT_WORKER_KEY="wk"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert token.returncode == 0 and token.stdout.strip() == worker_token("wk", "gpu-7") != worker_token("wk", "gpu-8")
    no_key = subprocess.run(
        [sys.executable, "-m", "worker.cli", "endpoint", "--worker-token", "gpu-7"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_key.returncode == 2 and "FTW_ENDPOINT_WORKER_KEY" in no_key.stderr
    same = ftw_endpoint(tmp_path, FTW_ENDPOINT_API_KEY=API_KEY, FTW_ENDPOINT_WORKER_KEY=API_KEY)
    assert same.wait(timeout=60) == 2 and "must differ" in same.stderr.read()

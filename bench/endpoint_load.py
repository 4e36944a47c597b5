"""Load on the local endpoint: /run, /status and refused requests from several client threads.

    .venv/bin/python bench/endpoint_load.py [--requests 2000] [--threads 8]

Starts `ftw endpoint` (a subprocess, fresh SQLite file, no worker so /run jobs stay queued), then
`--threads` clients, each with its own keep-alive session, send the mix: 45% POST /run, 45% GET
/status of a job created earlier, 10% bad requests (malformed JSON → 400, wrong key → 401). An
error is any other status or a transport failure; the run fails (exit 1) if there is one. GET
/health is measured first alone, as the baseline the other rows are compared with.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker.devtools.endpoint.local import LocalEndpoint  # noqa: E402

KEY = "bench-key"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Load:
    def __init__(self, endpoint: LocalEndpoint):
        self.root = f"{endpoint.base_url}/{endpoint.endpoint_id}"
        self.latencies: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.job_ids: list[str] = []
        self.lock = threading.Lock()

    def one(self, session: requests.Session, op: str, rng: random.Random) -> None:
        if op == "POST /run":
            call, expect = lambda: session.post(f"{self.root}/run", json={"input": {"n": rng.random()}}), 200
        elif op == "GET /status":
            job_id = rng.choice(self.job_ids)
            call, expect = lambda: session.get(f"{self.root}/status/{job_id}"), 200
        elif op == "GET /health":
            call, expect = lambda: session.get(f"{self.root}/health"), 200
        elif op == "bad JSON (400)":
            call, expect = lambda: session.post(f"{self.root}/run", data=b'{"input": '), 400
        else:
            call, expect = lambda: session.get(f"{self.root}/health", headers={"Authorization": "Bearer no"}), 401
        started = time.perf_counter()
        try:
            response = call()
            ok = response.status_code == expect and "application/json" in response.headers.get("Content-Type", "")
            outcome = f"{op}: HTTP {response.status_code}"
        except requests.RequestException as e:
            ok, outcome, response = False, f"{op}: {type(e).__name__}", None
        elapsed = time.perf_counter() - started
        with self.lock:
            self.latencies.setdefault(op, []).append(elapsed)
            if not ok:
                self.errors.append(outcome)
            elif op == "POST /run":
                self.job_ids.append(response.json()["id"])

    def run(self, ops: list[str], threads: int) -> float:
        chunks = [ops[i::threads] for i in range(threads)]

        def client(chunk: list[str], seed: int) -> None:
            rng = random.Random(seed)
            with requests.Session() as session:
                session.headers["Authorization"] = f"Bearer {KEY}"
                for op in chunk:
                    self.one(session, op, rng)

        workers = [threading.Thread(target=client, args=(chunk, i)) for i, chunk in enumerate(chunks)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalEndpoint(Path(tmp) / "bench.sqlite3", KEY, log_path=Path(tmp) / "endpoint.log") as endpoint,
    ):
        load = Load(endpoint)
        baseline_s = load.run(["GET /health"] * (args.requests // 4), args.threads)
        load.run(["POST /run"] * args.threads * 4, args.threads)  # jobs for /status to read
        load.latencies.pop("POST /run")
        rng = random.Random(0)
        ops = rng.choices(
            ["POST /run", "GET /status", "bad JSON (400)", "wrong key (401)"], weights=[45, 45, 5, 5], k=args.requests
        )
        mixed_s = load.run(ops, args.threads)

    base_p50 = statistics.median(load.latencies["GET /health"])
    print(
        f"endpoint load: {args.requests} mixed requests + {args.requests // 4} /health, {args.threads} client "
        f"threads, loopback, SQLite WAL; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'request':<18}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p50 / health':>14}")
    for op, values in load.latencies.items():
        print(
            f"{op:<18}{len(values):>7}{1000 * statistics.median(values):>9.2f}{1000 * percentile(values, 0.99):>9.2f}"
            f"{1000 * max(values):>9.2f}{statistics.median(values) / base_p50:>14.2f}"
        )
    print(
        f"throughput: /health alone {args.requests // 4 / baseline_s:,.0f} req/s; "
        f"mixed {args.requests / mixed_s:,.0f} req/s"
    )
    print(f"errors: {len(load.errors)}" + (f" — {sorted(set(load.errors))[:5]}" if load.errors else ""))
    return 1 if load.errors else 0


if __name__ == "__main__":
    sys.exit(main())

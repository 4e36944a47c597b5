"""Serving on CPU over HTTP: vLLM against the transformers+peft engine, measured in the same run with the real
`openai` client.

    .venv/bin/python bench/serve.py [--requests 32] [--concurrency 32] [--max-tokens 32] [--threads 1]

Builds the tiny model (worker/devtools/tiny.py), trains one LoRA adapter for real and publishes it to a loopback S3
server (rclone). Then, for each engine in turn with the same settings (dtype the model's, MAX_NUM_SEQS,
OpenMP threads, `--enforce-eager` for vLLM as the tests use): starts `ftw serve` as a user does
(a subprocess, its own port) and measures
- start-up: from the command to `/health` answering (engine loaded, HTTP listening);
- cold adapter: the first request naming the adapter's s3:// URI (pull, verify, engine load, 1 token),
  then the same request warm;
- load: `--requests` chat requests naming the adapter, `--concurrency` at a time, sampled (temperature 0.8,
  a seed each), up to `--max-tokens` new tokens: requests/s, p50/p99 latency, output tokens/s.
Needs .venv-vllm (`make vllm-env`). Prints a markdown table; the ratio column is vLLM / transformers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.s3server import free_port, running_s3_server  # noqa: E402
from tests.serve.conftest import serve_env, upload_adapter  # noqa: E402
from tests.serve.tiny_adapter import train_tiny_adapter  # noqa: E402


class NoHub:
    endpoint_url, token = "http://127.0.0.1:9", "unused"


def start_ftw_serve(engine: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str, float]:
    """`ftw serve` as a user starts it; returns once its /health answers, with the seconds that took."""
    port = free_port()
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--engine", engine, "--port", str(port)],
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ftw serve ({engine}) exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"ftw serve ({engine}) did not answer /health in 900 s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def measure(url: str, adapter: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    hello = [{"role": "user", "content": "hello"}]

    async def timed(**kw) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = await client.chat.completions.create(model=adapter, **kw)
        return time.perf_counter() - t0, out.usage.completion_tokens

    try:
        cold, _ = await timed(messages=hello, max_tokens=1, temperature=0)
        warm, _ = await timed(messages=hello, max_tokens=1, temperature=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> tuple[float, int]:
            async with gate:
                return await timed(
                    messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=max_tokens, temperature=0.8, seed=i
                )

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    latencies = sorted(r[0] for r in results)
    return {
        "cold_s": cold,
        "warm_s": warm,
        "req_s": requests / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "tok_s": sum(r[1] for r in results) / wall,
    }


ROWS = [
    ("start-up: command to /health (s)", "startup_s", "{:.1f}"),
    ("cold adapter: first request naming it, 1 token (s)", "cold_s", "{:.2f}"),
    ("the same request, adapter loaded (s)", "warm_s", "{:.2f}"),
    ("requests/s", "req_s", "{:.2f}"),
    ("latency p50 (s)", "p50_s", "{:.2f}"),
    ("latency p99 (s)", "p99_s", "{:.2f}"),
    ("output tokens/s", "tok_s", "{:.1f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads of each engine")
    args = parser.parse_args(argv)
    from worker.devtools.tiny import build_model

    vllm_python = REPO / ".venv-vllm" / "bin" / "python"
    if not vllm_python.exists():
        print("bench/serve.py: .venv-vllm is missing; run `make vllm-env` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ftw-bench-serve-") as tmp, running_s3_server(Path(tmp) / "s3") as s3:
        root = Path(tmp)
        base = build_model(root / "base")
        adapter = train_tiny_adapter(base, root / "adapter", "hello world hello world hello world")
        s3.make_bucket("bench")
        uri = upload_adapter(s3.client(), adapter, "bench", "runs/r1/adapter")
        results: dict[str, dict[str, float]] = {}
        for engine, python in (("transformers", sys.executable), ("vllm", str(vllm_python))):
            env = serve_env(
                base,
                s3,
                NoHub,
                root / f"volume-{engine}",
                FTW_SERVE_PYTHON=python,
                OMP_NUM_THREADS=str(args.threads),
                MAX_NUM_SEQS=str(max(8, args.concurrency)),
            )
            proc, url, startup = start_ftw_serve(engine, env, root / f"{engine}.log")
            try:
                results[engine] = {
                    "startup_s": startup,
                    **asyncio.run(measure(url, uri, args.requests, args.concurrency, args.max_tokens)),
                }
            finally:
                stop(proc)
            print(f"{engine}: {results[engine]}", file=sys.stderr, flush=True)
    ref, fast = results["transformers"], results["vllm"]
    print(
        f"\n{args.requests} chat requests naming one LoRA adapter ({args.concurrency} at a time, ≤{args.max_tokens} "
        "new tokens, sampled), over HTTP with the openai client; tiny Llama (worker/devtools/tiny.py, float32), CPU, "
        f"{args.threads} thread(s) per engine\n"
    )
    print("| measure | transformers | vLLM | vLLM / transformers |")
    print("|---|---:|---:|---:|")
    for label, key, fmt in ROWS:
        print(f"| {label} | {fmt.format(ref[key])} | {fmt.format(fast[key])} | {fast[key] / ref[key]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

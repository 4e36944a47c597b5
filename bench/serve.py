"""Serving throughput on CPU: vLLM against the transformers+peft engine in the same run, plus adapter cold-pull latency.

    .venv/bin/python bench/serve.py [--requests 32] [--max-tokens 32] [--threads 1]

Builds the tiny model (worker/tiny.py), trains one LoRA adapter for real, publishes it to a loopback
S3 server (rclone), then for each engine in turn (one at a time, same thread count): starts the
serving worker as serve_handler.py does, measures the cold pull (what the first request naming the
adapter waits for: manifest read, download, verify, engine load) and one request, then fires `--requests`
concurrent chat requests with the adapter and reports requests/s and output tokens/s.
Needs .venv-vllm (`make vllm-env`). Prints a markdown table; ratios are against the transformers engine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.s3server import running_s3_server  # noqa: E402
from tests.serve.conftest import chat, collect, serve_env, start_service, upload_adapter  # noqa: E402
from tests.serve.tiny_adapter import train_tiny_adapter  # noqa: E402


class NoHub:
    endpoint_url, token = "http://127.0.0.1:9", "unused"


async def measure(service, adapter_uri: str, requests: int, max_tokens: int) -> dict[str, float]:
    app = service.app
    try:
        return await _measure(app, adapter_uri, requests, max_tokens)
    finally:
        await app.client.close()


async def _measure(app, adapter_uri: str, requests: int, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    await app.adapters.get(adapter_uri)  # what a first request waits for: manifest, download, verify, engine load
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = await collect(app, chat(adapter_uri, max_tokens=max_tokens))
    warm = time.perf_counter() - t0
    assert "error" not in first[0], first
    prompts = [f"hello {i}" for i in range(requests)]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(collect(app, chat(adapter_uri, content=p, max_tokens=max_tokens, temperature=0.8, seed=i))
                                  for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    failed = [o for o in outs if "error" in o[0]]
    assert not failed, failed[:2]
    tokens = sum(o[0]["usage"]["completion_tokens"] for o in outs)
    return {"cold_s": cold, "warm_s": warm, "wall_s": wall, "req_s": requests / wall, "tok_s": tokens / wall, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each engine")
    args = parser.parse_args(argv)
    from worker.tiny import build_model

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
        results = {}
        for engine, python in (("vllm", str(vllm_python)), ("transformers", sys.executable)):
            env = serve_env(base, s3, NoHub, root / f"volume-{engine}", FTW_SERVE_PYTHON=python,
                            OMP_NUM_THREADS=str(args.threads), MAX_NUM_SEQS=str(max(8, args.requests)))
            t0 = time.perf_counter()
            with start_service(engine, env, root / f"{engine}.log") as service:
                startup = time.perf_counter() - t0
                results[engine] = {"startup_s": startup, **asyncio.run(measure(service, uri, args.requests, args.max_tokens))}
            print(f"{engine}: done ({results[engine]})", flush=True)
    ref = results["transformers"]
    print(f"\n{args.requests} concurrent chat requests with one LoRA adapter, ≤{args.max_tokens} new tokens each, "
          f"tiny Llama (worker/tiny.py), CPU, {args.threads} thread(s) per engine\n")
    print("| engine | startup s | adapter cold pull + load s | one answer s | requests/s | output tokens/s | × transformers |")
    print("|---|---|---|---|---|---|---|")
    for engine, r in results.items():
        print(f"| {engine} | {r['startup_s']:.1f} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {r['req_s']:.2f} | "
              f"{r['tok_s']:.1f} | {r['tok_s'] / ref['tok_s']:.2f} |")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

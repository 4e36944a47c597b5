"""`ftw endpoint`: run a local RunPod-compatible serverless endpoint (client API + worker API).

    FTW_ENDPOINT_API_KEY=secret ftw endpoint [--host 127.0.0.1] [--port 8000] [--db PATH]
        [--endpoint-id local] [--execution-timeout-ms 600000] [--webhook-retry-delay-s 10]
        [--worker handler.py ...]
    FTW_ENDPOINT_WORKER_KEY=other ftw endpoint --worker-token NAME   # prints worker NAME's token

Clients: RUNPOD_ENDPOINT_BASE_URL=http://127.0.0.1:8000/v2 RUNPOD_ENDPOINT_ID=local
RUNPOD_API_KEY=secret ftw submit job.json. Workers have their own key, as on RunPod: `--worker
handler.py` starts one (an unmodified `python handler.py` in RunPod's platform mode, its log on
this terminal) with its own token. To start workers elsewhere, set FTW_ENDPOINT_WORKER_KEY (a
different secret) where the endpoint runs, and give each worker RUNPOD_POD_ID=NAME,
RUNPOD_AI_API_KEY=$(ftw endpoint --worker-token NAME) and the variables printed at start-up;
without FTW_ENDPOINT_WORKER_KEY the endpoint makes up a worker key that only `--worker` knows.
`--port 0` picks a free port; the first stdout line is always
`ftw endpoint listening on http://HOST:PORT` so scripts can read the address.
Jobs live in the SQLite file (`--db`, default ./volume/endpoint.sqlite3): a restart loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

EXIT_USAGE = 2


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ftw endpoint",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--db", type=Path, default=Path(os.environ.get("BASE_VOLUME", "volume")) / "endpoint.sqlite3")
    p.add_argument("--endpoint-id", default="local")
    p.add_argument(
        "--execution-timeout-ms",
        type=int,
        default=600_000,
        help="default policy.executionTimeout of jobs that set none (RunPod's default: 600000)",
    )
    p.add_argument("--webhook-retry-delay-s", type=float, default=10.0)
    p.add_argument("--take-wait-s", type=float, default=20.0, help="long-poll of job-take and job-stop")
    p.add_argument("--worker-lost-s", type=float, default=120.0, help="no heartbeat for this long fails the job")
    p.add_argument(
        "--worker",
        type=Path,
        action="append",
        default=[],
        metavar="HANDLER",
        help="start `python HANDLER` as a worker of this endpoint (repeat for more)",
    )
    p.add_argument(
        "--worker-token", metavar="NAME", help="print the token of worker NAME (from FTW_ENDPOINT_WORKER_KEY) and exit"
    )
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, api_key: str, worker_key: str, worker_key_made_up: bool) -> None:
    from aiohttp import web

    from worker.devtools.endpoint.local import spawn_worker
    from worker.devtools.endpoint.server import EndpointSettings, create_app, worker_urls
    from worker.devtools.endpoint.store import JobStore

    settings = EndpointSettings(
        api_key=api_key,
        worker_key=worker_key,
        endpoint_id=args.endpoint_id,
        default_execution_timeout_ms=args.execution_timeout_ms,
        take_wait_s=args.take_wait_s,
        stop_wait_s=args.take_wait_s,
        worker_lost_s=args.worker_lost_s,
        webhook_retry_delay_s=args.webhook_retry_delay_s,
    )
    store = JobStore(args.db)
    runner = web.AppRunner(create_app(store, settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    print(f"ftw endpoint listening on {base}", flush=True)
    print(
        f"  clients: RUNPOD_ENDPOINT_BASE_URL={base}/v2 RUNPOD_ENDPOINT_ID={args.endpoint_id} "
        "RUNPOD_API_KEY=<FTW_ENDPOINT_API_KEY>",
        flush=True,
    )
    print(
        "  workers: RUNPOD_POD_ID=<name> RUNPOD_AI_API_KEY=<ftw endpoint --worker-token name> "
        + " ".join(f"{k}='{v}'" for k, v in worker_urls(base, args.endpoint_id).items()),
        flush=True,
    )
    if worker_key_made_up:
        print("  FTW_ENDPOINT_WORKER_KEY is not set: only the workers started here with --worker can join", flush=True)
    print(f"  jobs stored in {args.db}", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"  note: listening on {host}, beyond loopback: anyone who reaches it with the key can submit jobs",
            flush=True,
        )
    local = f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "::") else base
    workers = [spawn_worker(handler, local, args.endpoint_id, worker_key) for handler in args.worker]
    for handler, worker in zip(args.worker, workers):
        print(f"  worker {worker.worker_id}: python {handler} (pid {worker.pid})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for worker in workers:
            if worker.alive():
                os.killpg(worker.pid, signal.SIGTERM)
        await runner.cleanup()  # releases the workers' long-polls, so they exit at once
        for worker in workers:
            await asyncio.to_thread(worker.stop)
        store.close()


def main(argv: list[str]) -> int:
    try:
        args = parse(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    worker_key = os.environ.get("FTW_ENDPOINT_WORKER_KEY", "")
    if args.worker_token is not None:
        from worker.devtools.endpoint.server import worker_token

        if not worker_key:
            print(
                "ftw endpoint: set FTW_ENDPOINT_WORKER_KEY (the endpoint's) to print a worker's token", file=sys.stderr
            )
            return EXIT_USAGE
        print(worker_token(worker_key, args.worker_token))
        return 0
    api_key = os.environ.get("FTW_ENDPOINT_API_KEY", "")
    if not api_key:
        print(
            "ftw endpoint: set FTW_ENDPOINT_API_KEY to the API key clients and workers must send "
            "(e.g. export FTW_ENDPOINT_API_KEY=$(openssl rand -hex 16))",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if worker_key == api_key:
        print(
            "ftw endpoint: FTW_ENDPOINT_WORKER_KEY must differ from FTW_ENDPOINT_API_KEY (a client must not be "
            "able to act as a worker)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    made_up = not worker_key
    worker_key = worker_key or secrets.token_hex(32)  # known only to this process and the workers it starts
    missing = [str(h) for h in args.worker if not h.is_file()]
    if missing:
        print(
            f"ftw endpoint: no handler file {', '.join(missing)} (--worker takes the path of a handler.py)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        asyncio.run(serve(args, api_key, worker_key, made_up))
    except OSError as e:
        print(f"ftw endpoint: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`ftw submit|status|stream|cancel`: drive a RunPod endpoint (or `ftw endpoint`) with the runpod client.

    ftw submit JOB.json [--wait] [--webhook URL] [--execution-timeout 24h] [--ttl 48h] [--no-validate] [--estimate]
    ftw status JOB_ID            the /status body as JSON
    ftw stream JOB_ID            live progress lines until the job ends, then its /status body
    ftw cancel JOB_ID

Environment: RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY; RUNPOD_ENDPOINT_BASE_URL picks the server
(default https://api.runpod.ai/v2; for `ftw endpoint` on this machine http://127.0.0.1:8000/v2).
JOB.json is the job input (YAML works too) or a whole request {"input", "webhook", "policy",
"s3Config"}. RunPod kills a job after policy.executionTimeout (default 10 minutes) and drops it
after policy.ttl; fine-tuning needs more, so submit sets executionTimeout 24h and ttl
executionTimeout + 24h (RunPod's maximum for both: 7 days) unless the request or a flag says
otherwise. The job is validated here first, so a bad config costs no GPU time; `--estimate` also
prints (on stderr) `ftw estimate`'s table: peak memory, time and cost on each GPU type.
Exit codes: 0 done (for --wait/stream: COMPLETED), 1 the job FAILED / was CANCELLED / TIMED_OUT,
2 usage or environment error, 3 the job is invalid, 4 the endpoint refused or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_INVALID, EXIT_ENDPOINT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")  # the SDK's FINAL_STATES lacks CANCELLED
MAX_POLICY_MS = 7 * 24 * 3600 * 1000
DEFAULT_EXECUTION_TIMEOUT_MS = 24 * 3600 * 1000
QUEUE_ALLOWANCE_MS = 24 * 3600 * 1000
UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class ClientError(Exception):
    def __init__(self, message: str, code: int = EXIT_ENDPOINT):
        super().__init__(message)
        self.code = code


def duration_ms(text: str) -> int:
    """'90m', '24h', '2d', '3600s', '5000ms' or plain seconds → milliseconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90m, 24h, 2d or 3600s")
    return int(float(match[1]) * UNITS_MS[match[2] or "s"])


def build_request(
    doc: Any, webhook: str | None, execution_timeout_ms: int | None, ttl_ms: int | None
) -> dict[str, Any]:
    """The /run body: the document as input (or as the request), with policies fit for training."""
    request = dict(doc) if isinstance(doc, dict) and "input" in doc else {"input": doc}
    policy = dict(request.get("policy") or {})
    if execution_timeout_ms is not None or "executionTimeout" not in policy:
        policy["executionTimeout"] = execution_timeout_ms or DEFAULT_EXECUTION_TIMEOUT_MS
    if ttl_ms is not None or "ttl" not in policy:
        policy["ttl"] = ttl_ms or min(MAX_POLICY_MS, policy["executionTimeout"] + QUEUE_ALLOWANCE_MS)
    for key in ("executionTimeout", "ttl"):
        if policy[key] > MAX_POLICY_MS:
            raise ClientError(f"policy.{key} of {policy[key]} ms is over RunPod's maximum of 7 days", EXIT_USAGE)
    if policy["ttl"] < policy["executionTimeout"]:
        raise ClientError(
            "policy.ttl counts queue time plus run time: make it at least the executionTimeout "
            f"({policy['ttl']} ms < {policy['executionTimeout']} ms)",
            EXIT_USAGE,
        )
    request["policy"] = policy
    if webhook:
        request["webhook"] = webhook
    return request


def format_progress(output: Any) -> str:
    """A progress update as the terminal line `ftw run` prints; anything else as compact JSON."""
    from worker.job.updates import format_line

    if isinstance(output, dict) and "stage" in output and ("step" in output or output.get("type") == "progress"):
        return format_line(output)
    return json.dumps(output, separators=(",", ":"), default=str)


class Client:
    """The runpod SDK's Endpoint, with its errors turned into messages that say what to do."""

    def __init__(self, env: dict[str, str]):
        import runpod

        endpoint_id, api_key = env.get("RUNPOD_ENDPOINT_ID"), env.get("RUNPOD_API_KEY")
        if not endpoint_id or not api_key:
            raise ClientError(
                "set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY (for `ftw endpoint` on this machine also "
                "RUNPOD_ENDPOINT_BASE_URL=http://127.0.0.1:8000/v2)",
                EXIT_USAGE,
            )
        if env.get("RUNPOD_ENDPOINT_BASE_URL"):
            runpod.endpoint_url_base = env["RUNPOD_ENDPOINT_BASE_URL"].rstrip("/")
        self.base = runpod.endpoint_url_base
        self.endpoint = runpod.Endpoint(endpoint_id, api_key=api_key)
        self.id = endpoint_id
        self._fail_fast_when_unreachable()

    def _fail_fast_when_unreachable(self) -> None:
        """The SDK retries a refused connection 5 times with backoff (~30 s): two tries (~1 s) say enough."""
        import logging

        from requests.adapters import HTTPAdapter, Retry

        logging.getLogger("urllib3").setLevel(logging.ERROR)  # our message below says it once, plainly

        retries = Retry(total=5, connect=2, backoff_factor=0.5, status_forcelist=[408, 429])
        for scheme in ("http://", "https://"):
            self.endpoint.rp_client.rp_session.mount(scheme, HTTPAdapter(max_retries=retries))

    def call(self, method: str, path: str, data: dict[str, Any] | None = None, timeout: int = 30) -> Any:
        import requests

        try:
            if method == "GET":
                return self.endpoint.rp_client.get(f"{self.id}/{path}", timeout=timeout)
            return self.endpoint.rp_client.post(f"{self.id}/{path}", data, timeout=timeout)
        except RuntimeError as e:  # the SDK's 401
            raise ClientError(f"{self.base} refused the API key (401): check RUNPOD_API_KEY") from e
        except requests.HTTPError as e:
            raise ClientError(
                f"{self.base}/{self.id}/{path}: HTTP {e.response.status_code}: {_error_text(e.response)}"
            ) from e
        except requests.RequestException as e:
            raise ClientError(
                f"cannot reach {self.base} ({type(e).__name__}); is the endpoint running and "
                "RUNPOD_ENDPOINT_BASE_URL right?"
            ) from e


def _error_text(response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text[:500]


def follow(client: Client, job_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Print progress lines from /stream until the job is terminal; return its /status body."""
    try:
        while True:
            chunk = client.call("GET", f"stream/{job_id}")
            for item in chunk.get("stream", []):
                print(format_progress(item.get("output")), flush=True)
            if chunk.get("status") in TERMINAL:
                return client.call("GET", f"status/{job_id}")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        raise ClientError(
            f"stopped following; job {job_id} keeps running: `ftw stream {job_id}` follows it again, "
            f"`ftw cancel {job_id}` stops it",
            EXIT_INTERRUPTED,
        ) from None


def finish(status: dict[str, Any]) -> int:
    print(json.dumps(status), flush=True)
    if status.get("status") != "COMPLETED":
        print(
            f"job {status.get('id')} ended {status.get('status')}: {status.get('error', 'no error message')}",
            file=sys.stderr,
        )
        return EXIT_JOB_FAILED
    return EXIT_OK


def submit(args: argparse.Namespace, client_env: dict[str, str]) -> int:
    from worker.documents import read_document

    doc, readable = read_document(args.job, "ftw submit")
    if not readable:
        return EXIT_USAGE
    request = build_request(doc, args.webhook, args.execution_timeout, args.ttl)
    if not args.no_validate:
        from schemas.job import validate_job

        report = validate_job(request["input"])
        for issue in report.warnings:
            print(f"warning {issue}", file=sys.stderr)
        if not report.valid:
            for issue in report.errors:
                print(f"error   {issue}", file=sys.stderr)
            print(
                "ftw submit: the job is invalid and was not sent (--no-validate sends it anyway, e.g. when a "
                "path exists only where the worker runs)",
                file=sys.stderr,
            )
            return EXIT_INVALID
    if args.estimate:
        show_estimate(request["input"], client_env)
    client = Client(client_env)
    job = client.call("POST", "run", request)
    print(f"submitted job {job['id']} ({job['status']}) to {client.base}/{client.id}", file=sys.stderr, flush=True)
    if not args.wait:
        print(json.dumps(job), flush=True)
        return EXIT_OK
    return finish(follow(client, job["id"]))


def show_estimate(job_input: Any, env: dict[str, str]) -> None:
    """`ftw estimate`'s table for the job's config on stderr; a job it cannot estimate is still sent."""
    from worker.estimate.command import estimate_text

    text, problem = estimate_text(job_input, env)
    print(
        text if problem is None else f"ftw submit: no estimate ({problem}); submitting anyway",
        file=sys.stderr,
        flush=True,
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ftw",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="send a job (POST /run)")
    s.add_argument("job", type=Path)
    s.add_argument("--wait", action="store_true", help="stream progress until the job ends")
    s.add_argument("--webhook", help="URL that receives the /status body when the job ends")
    s.add_argument("--execution-timeout", type=duration_ms, help="policy.executionTimeout (default 24h)")
    s.add_argument("--ttl", type=duration_ms, help="policy.ttl (default executionTimeout + 24h, at most 7d)")
    s.add_argument("--no-validate", action="store_true", help="send without validating the job here first")
    s.add_argument("--estimate", action="store_true", help="print peak memory, time and cost on each GPU type first")
    for name, text in (
        ("status", "print the job's status"),
        ("stream", "follow the job's progress"),
        ("cancel", "cancel the job"),
    ):
        sub.add_parser(name, help=text).add_argument("job_id")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        args = parse(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    env = dict(os.environ)
    try:
        if args.command == "submit":
            return submit(args, env)
        client = Client(env)
        if args.command == "status":
            print(json.dumps(client.call("GET", f"status/{args.job_id}")))
            return EXIT_OK
        if args.command == "stream":
            return finish(follow(client, args.job_id))
        print(json.dumps(client.call("POST", f"cancel/{args.job_id}")))
        return EXIT_OK
    except ClientError as e:
        print(f"ftw {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

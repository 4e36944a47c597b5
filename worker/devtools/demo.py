"""`make demo` — one real fine-tuning job on this machine, along the path it takes on RunPod.

    python -m worker.devtools.demo [--volume ./volume] [--prepare]

`--prepare` (`make demo-volume`) only does step 1: the inputs examples/demo_job.json names, for the
README's rehearsal with `ftw endpoint` and `ftw submit`.

1. builds the tiny base model locally (BASE_VOLUME/models/ftw-tiny-chatml; no Hub needed) and
   copies the bundled example data (examples/data/greetings.jsonl) into the volume;
2. starts the local RunPod-compatible endpoint and one unmodified `python handler.py` worker
   against it (platform mode of the real runpod SDK), plus a webhook listener on loopback;
3. submits examples/demo_job.json with the runpod client, streams its progress (stage, step, loss,
   tokens/s, ETA) until it ends, and shows the webhook RunPod-style delivery;
4. prints where the adapter is (the local artifact store, verified by its manifest) and a sample
   generation of the base model with it.
Embedded defaults: local volume, local store, CPU (FTW_ALLOW_CPU=1). Logs: BASE_VOLUME/logs/.
The heavy libraries are only imported in the children (`--build-model`, `--sample`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_JOB = REPO / "examples" / "demo_job.json"
EXAMPLE_DATA = REPO / "examples" / "data" / "greetings.jsonl"
MODEL_NAME = "ftw-tiny-chatml"
PROMPTS = ("greet alice", "greet zoe")


# ---- children: the heavy parts ----------------------------------------------------------------
def build_model(out: Path) -> None:
    """The tiny Llama-architecture base, its tokenizer trained on the example data's text too.
    Initialised 10× wider than transformers' 0.02: with a frozen random head at 0.02 the logits of
    a 128-wide model cannot exceed ~2.5, so LoRA alone never makes a confident prediction; at 0.2
    the adapter learns to answer "Hello, <name>!" with the asked name within the demo's steps."""
    from worker.devtools.tiny import build_model as build

    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()]
    text = [m["content"] for r in rows for m in r["messages"]]
    build(out, style="chatml", extra_text=text, initializer_range=0.2)


def sample(base: Path, adapter: Path, prompts: list[str]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()

    def generate(prompt: str) -> str:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    for prompt in prompts:
        with model.disable_adapter():
            before = generate(prompt)
        print(f"  {prompt!r}:  base model → {before!r}   with the adapter → {generate(prompt)!r}", flush=True)


# ---- the demo itself ---------------------------------------------------------------------------
class WebhookListener:
    """Receives RunPod-style webhooks (the /status body, POSTed when the job ends) on loopback."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/ftw-demo-webhook"

    def wait(self, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while not self.received and time.monotonic() < deadline:
            time.sleep(0.2)
        self.server.shutdown()
        return self.received[0] if self.received else None


def child(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "worker.devtools.demo", *args], check=True, env=env, cwd=REPO)


def prepare_volume(volume: Path) -> None:
    model = volume / "models" / MODEL_NAME
    if not (model / "config.json").is_file():
        print(f"building the tiny base model in {model} ...", flush=True)
        child("--build-model", str(model))
    (volume / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE_DATA, volume / "data" / EXAMPLE_DATA.name)


def run_demo(volume: Path) -> int:
    from worker.devtools.endpoint.client_cli import EXIT_INTERRUPTED, Client, ClientError, build_request, follow
    from worker.devtools.endpoint.local import LocalEndpoint

    prepare_volume(volume)
    job = json.loads(EXAMPLE_JOB.read_text())["input"]
    job["run_id"] = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = volume / "logs"
    webhook = WebhookListener()
    print(f"starting the local endpoint and a runpod worker (logs in {logs}) ...", flush=True)
    with LocalEndpoint(
        db=volume / "endpoint.sqlite3",
        api_key=secrets.token_hex(16),
        log_path=logs / "endpoint.log",
        env={"FTW_ALLOWED_HOSTS": "127.0.0.1"},
    ) as endpoint:  # the webhook listener is on loopback
        endpoint.start_worker(
            REPO / "handler.py",
            log_path=logs / "worker.log",
            env={"BASE_VOLUME": str(volume), "FTW_ALLOW_CPU": "1", "FTW_PROGRESS_INTERVAL_S": "1"},
        )
        client = Client(endpoint.client_env())
        submitted = client.call("POST", "run", build_request({"input": job}, webhook.url, None, None))
        print(f"submitted job {submitted['id']} (run_id {job['run_id']}); progress:", flush=True)
        try:
            status = follow(client, submitted["id"])
        except ClientError as e:  # Ctrl-C, or the endpoint failed: leaving this block stops the worker and the job
            reason = "interrupted" if e.code == EXIT_INTERRUPTED else f"stopped: {e}"
            print(f"\ndemo {reason}; its endpoint and worker are stopped (logs in {logs})", file=sys.stderr)
            return e.code
        hook = webhook.wait(10)  # delivered by the endpoint, so while it still runs
    print(f"webhook received: status {hook['status']}" if hook else "webhook: none received within 10 s", flush=True)
    if status.get("status") != "COMPLETED":
        print(f"\nthe demo job ended {status.get('status')}: {status.get('error')}", file=sys.stderr)
        print(f"worker log: {logs / 'worker.log'}", file=sys.stderr)
        return 1
    result = status["output"][-1]
    adapter = next(a for a in result["artifacts"] if a["kind"] == "adapter")
    folder = Path(adapter["uri"].removeprefix("file://"))
    metrics = result["metrics"]
    print(
        f"\ndone in {result['timings']['total_s']:.0f} s: {metrics.get('steps')} steps, "
        f"final loss {metrics.get('final_loss')}, "
        f"{metrics.get('tokens_per_s')} tokens/s"
    )
    print(f"adapter: {folder}  (sha256 manifest {adapter['sha256_manifest'][:16]}…, {adapter['files']} files)")
    print(f"run folder: {result['run_dir']}")
    print("sample generation, base model + adapter:", flush=True)
    child("--sample", str(volume / "models" / MODEL_NAME), str(folder), *PROMPTS)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--volume", type=Path, default=Path(os.environ.get("BASE_VOLUME") or "volume"))
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only put the demo job's inputs (tiny model, example data) into the volume",
    )
    parser.add_argument("--build-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sample", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_model:
        build_model(args.build_model)
        return 0
    if args.sample:
        base, adapter, *prompts = args.sample
        sample(Path(base), Path(adapter), prompts)
        return 0
    if args.prepare:
        prepare_volume(args.volume.resolve())
        print(f"the demo job's inputs are in {args.volume.resolve()}: models/{MODEL_NAME}, data/{EXAMPLE_DATA.name}")
        return 0
    return run_demo(args.volume.resolve())


if __name__ == "__main__":
    raise SystemExit(main())

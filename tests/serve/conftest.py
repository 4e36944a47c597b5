"""Serving fixtures: real adapters trained on the tiny model, published to the loopback S3 server and the
local Hub, and one engine per kind shared by the tests of this package (vLLM on CPU starts slowly; both stop after
them).

The vLLM engine runs in `.venv-vllm` (built by `make vllm-env`; the fixture builds it when missing),
as a child of the test process, exactly as serve_handler.py runs it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, VLLM_TEST_KV_CACHE
from tests.serve.tiny_adapter import train_tiny_adapter

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
BUCKET = "serve-adapters"
# What each adapter is trained to answer to "hello": their greedy outputs differ from each other and the base.
TEXTS = {"alpha": "hello world hello world hello world", "digits": "0 1 2 3 4 5 6 7 8 9 10 11 12"}


@dataclass(frozen=True)
class Published:
    local: dict[str, Path]  # name -> trained folder
    s3: dict[str, str]  # name -> s3:// URI
    hub: dict[str, str]  # name -> org/repo@revision
    broken_s3: str  # an adapter whose weights were damaged after its manifest was written
    templated_s3: str  # alpha's weights saved with a tokenizer whose chat template differs from the base's
    volume: Path


def upload_adapter(client, folder: Path, bucket: str, prefix: str) -> str:
    """Publish a trained adapter folder to S3 as training does: every file, the manifest last."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    for f in [*files, folder / "manifest.json"]:
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="package")
def serve_volume(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-volume")


@pytest.fixture(scope="package")
def published(tiny_model_dir, s3_server, hub_server, serve_volume, tmp_path_factory) -> Published:
    from huggingface_hub import HfApi

    root = tmp_path_factory.mktemp("adapters")
    local = {
        name: train_tiny_adapter(tiny_model_dir, root / name, text, seed=i)
        for i, (name, text) in enumerate(TEXTS.items())
    }
    s3_server.make_bucket(BUCKET)
    client = s3_server.client()
    s3 = {name: upload_adapter(client, folder, BUCKET, f"runs/{name}/adapter") for name, folder in local.items()}
    broken = root / "broken"
    subprocess.run(["cp", "-r", str(local["alpha"]), str(broken)], check=True)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated weights...
    from worker.publish.manifest import Manifest

    Manifest.of_folder(broken).write(broken)  # ...behind a manifest that matches them: only loading can tell
    broken_s3 = upload_adapter(client, broken, BUCKET, "runs/broken/adapter")
    templated = root / "templated"
    subprocess.run(["cp", "-r", str(local["alpha"]), str(templated)], check=True)
    (templated / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ 'Q: ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
    )
    Manifest.of_folder(templated).write(templated)
    templated_s3 = upload_adapter(client, templated, BUCKET, "runs/templated/adapter")

    api = HfApi(endpoint=hub_server.endpoint_url, token=hub_server.token)
    hub = {}
    for name, folder in local.items():
        api.create_repo(f"ftw-test/{name}", private=True, exist_ok=True)  # made again after a teardown
        commit = api.upload_folder(repo_id=f"ftw-test/{name}", folder_path=str(folder))
        hub[name] = f"ftw-test/{name}@{commit.oid}"
    return Published(local, s3, hub, broken_s3, templated_s3, serve_volume)


def serve_env(model_dir: Path, s3_server, hub_server, volume: Path, **extra: str) -> dict[str, str]:
    """The endpoint environment of a serving worker in tests (CPU-sized engine settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_", "BUCKET_", "RUNPOD_"))}
    env.update(s3_server.env())
    env.update(
        MODEL_NAME=str(model_dir),
        BASE_VOLUME=str(volume),
        HF_ENDPOINT=hub_server.endpoint_url,
        HF_TOKEN=hub_server.token,
        BUCKET_NAME=BUCKET,
        FTW_S3_PREFIX="runs",
        MAX_LORA_RANK="16",
        MAX_LORAS="2",
        MAX_CPU_LORAS="4",
        MAX_MODEL_LEN="256",
        MAX_NUM_SEQS="8",
        HF_HUB_DISABLE_TELEMETRY="1",
        # vLLM on 2 shared CPU cores, for start-up time only: eager, one thread; dtype is ftw's default (memory:
        # vllm_service sizes the KV cache)
        VLLM_EXTRA_ARGS="--distributed-executor-backend uni --enforce-eager",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS="1",
        FTW_SERVE_START_TIMEOUT_S="600",
        FTW_ENGINE_KEEP_ALIVE_S="1",  # test_idle_gaps' gaps are around it: 1 s, not uvicorn's 5
    )
    env.update(extra)
    return env


def ensure_vllm_env() -> Path:
    """.venv-vllm, built through the Makefile when this machine has none yet (CI's fresh machine)."""
    if not (REPO / ".venv-vllm" / ".installed").exists():
        subprocess.run(["make", "vllm-env"], cwd=REPO, check=True)
    return VLLM_PYTHON


def start_service(engine: str, env: dict[str, str], log: Path):
    from worker.serve.service import running_service
    from worker.serve.settings import ServeSettings

    return running_service(ServeSettings.from_env(env), engine=engine, log_path=log)


@pytest.fixture(scope="package")
def vllm_service(tiny_model_dir, s3_server, hub_server, serve_volume) -> Iterator:
    """The real vLLM (CPU build) serving the tiny model, adapters on demand."""
    python = ensure_vllm_env()
    env = serve_env(tiny_model_dir, s3_server, hub_server, serve_volume / "vllm", FTW_SERVE_PYTHON=str(python))
    env["VLLM_EXTRA_ARGS"] += f" {VLLM_TEST_KV_CACHE}"  # 8 sequences of 256 tokens need 2k
    with start_service("vllm", env, serve_volume / "vllm-engine.log") as service:
        STARTED.append(service)
        yield service


@pytest.fixture(scope="package")
def hf_service(tiny_model_dir, s3_server, hub_server, serve_volume) -> Iterator:
    """The transformers+peft engine (the fallback) on the same model: the reference outputs."""
    env = serve_env(tiny_model_dir, s3_server, hub_server, serve_volume / "hf", FTW_SERVE_PYTHON=sys.executable)
    with start_service("transformers", env, serve_volume / "hf-engine.log") as service:
        STARTED.append(service)
        yield service


STARTED: list = []  # services of this session: their engine clients are closed at the end of each run()


def run(coro):
    """One event loop per call (as RunPod's and ftw serve's loops are separate from the tests')."""

    async def main():
        try:
            return await coro
        finally:
            for service in STARTED:
                await service.app.client.close()

    return asyncio.run(main())


async def collect(app, job_input) -> list:
    return [out async for out in app.handle_job(job_input)]


def chat(model: str, content: str = "hello", **params) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
        "return_token_ids": True,
        **params,
    }
    return {"openai_route": "/v1/chat/completions", "openai_input": body}

"""Fixtures of the publish tests: a real tiny PEFT adapter, run folders, jobs, buckets, env."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from schemas.job import JobInput, parse_s3_config
from schemas.secrets import Redactor, job_credential_env
from tests.publish.faultproxy import FaultProxy
from worker.publish import PublishPlan

BASE_MODEL_ID = "ftw-tests/tiny-llama"
ENV_SECRET = "env-secret-value-never-in-a-card-123"
_names = itertools.count()


def tiny_png() -> bytes:
    """A valid 1×1 PNG (the loss curve stand-in; the train stage draws the real one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A real LoRA adapter of the tiny model, saved by peft (adapter_config.json + safetensors + tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def make_run_dir(root: Path, adapter: Path, checkpoints: tuple[int, ...] = (), merged: bool = False) -> Path:
    """A run folder as the train stage leaves it (docs/contracts.md)."""
    run = root / "run"
    shutil.copytree(adapter, run / "adapter")
    if merged:
        shutil.copytree(adapter, run / "merged")
    (run / "summary.json").write_text(
        json.dumps(
            {
                "final_loss": 1.2345,
                "steps": 10,
                "tokens_per_s": 1000.5,
                "runtime_s": 12.0,
                "loss_curve": [[1, 2.0], [10, 1.2345]],
                "output_dir": str(run / "out"),
            }
        )
    )
    (run / "loss.png").write_bytes(tiny_png())
    (run / "config.json").write_text(json.dumps({"base_model": BASE_MODEL_ID}))
    (run / "logs").mkdir()
    (run / "logs" / "train.log").write_text("step 10 loss 1.2345\n")
    for step in checkpoints:
        add_checkpoint(run, step)
    return run


def add_checkpoint(run: Path, step: int, size: int = 1000) -> Path:
    """Write a checkpoint the way the trainer does: a temp name, then renamed into place."""
    tmp = run / "checkpoints" / f".tmp-checkpoint-{step}"
    tmp.mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_bytes(bytes([step % 256]) * size)
    (tmp / "optimizer.pt").write_bytes(b"opt" * (size // 3))
    (tmp / "ftw_state.json").write_text(json.dumps({"step": step, "epoch": 0.1 * step}))
    final = run / "checkpoints" / f"checkpoint-{step}"
    tmp.rename(final)
    return final


def make_job(
    run_id: str,
    outputs: dict | None = None,
    publish: list[str] | None = None,
    credentials: dict | None = None,
    env: dict | None = None,
    **config,
):
    from schemas.job import validate_job

    raw = {
        "run_id": run_id,
        "config": {
            "base_model": BASE_MODEL_ID,
            "adapter": "lora",
            "lora_r": 8,
            "learning_rate": 1e-3,
            "datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}],
            **config,
        },
        "outputs": outputs or {},
        "publish": publish or ["adapter"],
        "credentials": credentials or {},
    }
    report = validate_job(raw, env=env or {})
    assert report.valid, report.errors
    return report.value


def plan_for(job: JobInput, env: dict[str, str], s3_config: dict[str, Any] | None = None) -> PublishPlan:
    """The job's PublishPlan, built as the orchestrator builds it (once, right after validation)."""
    bucket_config, problems = parse_s3_config(s3_config)
    assert not problems, problems
    redactor = Redactor.for_job(env, job_credential_env(job.credentials, s3_config), s3_config)
    return PublishPlan.resolve(job, bucket_config, env, redactor)


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.make_bucket(f"ftw-test-{next(_names)}")


@pytest.fixture
def env(volume, s3_server) -> dict[str, str]:
    """The endpoint environment of a test: its volume, the S3 server's BUCKET_* credentials, fast retries."""
    return {
        "BASE_VOLUME": str(volume),
        **s3_server.env(),
        "FTW_PUBLISH_BACKOFF_S": "0.05",
        "FTW_S3_PART_MB": "5",
        "FTW_S3_CONCURRENCY": "4",
        "SOME_API_KEY": ENV_SECRET,
    }


@pytest.fixture
def proxy(s3_server):
    """A FaultProxy in front of the S3 server: counts bytes, cuts connections on demand."""
    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    with FaultProxy((host, int(port))) as p:
        yield p

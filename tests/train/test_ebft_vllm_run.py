"""Structured EBFT with trl.use_vllm through `ftw run` on the real vLLM (CPU build): one job for the module (one
engine start): completions come from the engine the train child starts, the adapter is synced into it every
vllm_sync_interval steps, the feature-matching metrics are logged per step, the adapter is published and the
engine ends with the job. And an engine that does not come up fails the job with a clear error, leaving no
process of it behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import ensure_vllm_env
from tests.train.vllm_helpers import (
    LORA_RUN,
    engine_gone,
    ftw_run,
    processes_naming,
    result_of,
    train_events,
    vllm_env,
    write_job,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 3
MAX_COMPLETION = 6


def ebft_job(volume: Path, model: Path, run_id: str) -> Path:
    (volume / "qa.jsonl").write_text(
        "".join(json.dumps({"input": f"{i} {i + 1} ->", "output": f"{i + 2} {i + 3}"}) + "\n" for i in range(16))
    )
    job = {
        "input": {
            "run_id": run_id,
            "allow_cpu": True,
            "publish": ["adapter"],
            "config": {
                "base_model": str(model),
                "rl": "ebft",
                "chat_template": "chatml",
                "ebft": {"feature_layers": [0.5, 1.0], "use_whitening": True, "ce_coef": 0.1},
                "trl": {
                    "use_vllm": True,
                    "vllm_sync_interval": 2,
                    "num_generations": 2,
                    "max_completion_length": MAX_COMPLETION,
                    "beta": 0.04,
                },
                "datasets": [{"path": str(volume / "qa.jsonl"), "type": "ebft_opencode.transform"}],
                **LORA_RUN,
                "max_steps": STEPS,
            },
        }
    }
    return write_job(volume, run_id, job)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """The one EBFT + vLLM job of this module, run to its end: its result and its run folder."""
    volume = tmp_path_factory.mktemp("volume")
    job = ebft_job(volume, tiny_model_dir, "ebft-vllm")
    # the engine logs every request it receives, with the adapter it runs on
    logged = vllm_env(ensure_vllm_env())["VLLM_EXTRA_ARGS"] + " --enable-log-requests"
    result = result_of(ftw_run(volume, tiny_model_dir, job, {**vllm_env(ensure_vllm_env()), "VLLM_EXTRA_ARGS": logged}))
    return result, volume / "runs" / "ebft-vllm"


def test_the_job_completes_and_publishes_the_adapter(finished):
    result, _ = finished
    assert result["status"] == "completed", result
    assert any(a["kind"] == "adapter" for a in result["artifacts"]), result["artifacts"]


def test_every_step_logs_the_feature_matching_metrics_of_the_engines_completions(finished):
    _, run_dir = finished
    steps = [e for e in train_events(run_dir) if "ebft/cfm_loss" in e and "lr" in e]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    for e in steps:
        assert 0 < e["completion_length"] <= MAX_COMPLETION
        assert e["ebft/cfm_loss"] >= 0 and e["ebft/ce_loss"] > 0
        assert -2.0 <= e["ebft/alignment"] <= 2.0  # 2·cos of whitened features


def test_the_engine_generated_every_step_on_the_adapter_synced_every_interval(finished):
    _, run_dir = finished
    log = (run_dir / "vllm" / "engine.log").read_text()
    loaded = re.findall(r"Loaded new LoRA adapter: name '(policy-\d+)'", log)
    assert loaded == ["policy-0", "policy-2"], log[-3000:]  # before step 1 and before step 3: interval 2
    # one request per prompt (2 a step), each on the policy synced last: steps 1 and 2 on policy-0, 3 on policy-2
    requests = re.findall(r"Received request \S+: params: .*?n=2,.*lora_name='(policy-\d+)'", log)
    assert requests == ["policy-0"] * 4 + ["policy-2"] * 2, log[-3000:]


def test_the_engine_ends_with_the_job(finished):
    _, run_dir = finished
    assert engine_gone(run_dir / "vllm" / "engine.pid")


def test_an_engine_that_does_not_come_up_fails_the_job_and_leaves_no_process(tiny_model_dir, volume):
    model = shutil.copytree(tiny_model_dir, volume / "model")  # a folder only this job's engine names
    job = ebft_job(volume, model, "ebft-vllm-no-engine")
    result = result_of(ftw_run(volume, model, job, {**vllm_env(ensure_vllm_env()), "FTW_VLLM_START_TIMEOUT_S": "0"}))
    assert result["status"] == "failed", result
    error = result["error"]
    assert "vLLM for trl.use_vllm did not start: the vllm engine did not answer /health" in error["message"], error
    assert "FTW_VLLM_START_TIMEOUT_S" in error["hint"] and "trl.use_vllm: false" in error["hint"], error
    assert not (volume / "runs" / "ebft-vllm-no-engine" / "vllm" / "engine.pid").exists()
    assert processes_naming(str(model)) == []  # the engine ftw spawned is gone with the train child

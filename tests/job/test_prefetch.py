"""A Hub base model downloads beside preprocessing (worker/job/prefetch.py): its weights are fetched
before the train child starts, once; a failed prefetch costs nothing but the overlap; without it
(FTW_MODEL_PREFETCH=0) the train child downloads them itself, as before."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
from huggingface_hub import HfApi

from tests.job.conftest import example_job
from tests.processes import left_behind
from worker.job.pipeline import run_job
from worker.job.prefetch import files_to_fetch

pytestmark = pytest.mark.slow
CONFIG = {"max_steps": 2, "save_steps": None, "logging_steps": 1, "sequence_len": 64, "micro_batch_size": 2}


@pytest.fixture
def hub_model(hub_server, tiny_model_dir, request) -> str:
    endpoint, token = hub_server
    repo = f"prefetch-tests/{request.node.name[:40]}"
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo, private=True)
    api.upload_folder(folder_path=str(tiny_model_dir), repo_id=repo)
    return repo


def run(volume, hub_server, repo: str, run_id: str, stop=None, **env: str) -> dict:
    endpoint, token = hub_server
    hub = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(volume / "hf-home")}
    config = {**CONFIG, "base_model": repo}
    return run_job({"input": example_job(run_id=run_id, config=config)}, env={**os.environ, **hub, **env}, stop=stop)


def weights_requests(hub_server, repo: str) -> list[float]:
    """When the weights file was sent (GET), one time a download."""
    return [
        t
        for (method, path), t in zip(hub_server.requests, hub_server.request_times, strict=True)
        if method == "GET" and path.startswith(f"/{repo}/resolve/") and path.endswith("model.safetensors")
    ]


def train_loading(volume, run_id: str) -> float:
    """When the train child began loading the model (its own event)."""
    lines = (volume / "runs" / run_id / "logs" / "train" / "attempt-1" / "events.jsonl").read_text().splitlines()
    return next(e["ts"] for e in map(json.loads, lines) if e.get("event") == "loading")


def test_the_weights_download_before_the_train_stage_starts_and_once(demo_volume, hub_server, hub_model):
    result = run(demo_volume, hub_server, hub_model, "prefetched")
    assert result["status"] == "completed", result
    (sent,) = weights_requests(hub_server, hub_model)  # once: the train child found them in the cache
    assert sent < train_loading(demo_volume, "prefetched")
    log = (demo_volume / "runs" / "prefetched" / "logs" / "prefetch.log").read_text()
    assert re.search(rf"prefetched \d+ files of {hub_model} \(", log) and hub_server.token not in log


def test_without_the_prefetch_the_train_child_downloads_them(demo_volume, hub_server, hub_model):
    result = run(demo_volume, hub_server, hub_model, "not-prefetched", FTW_MODEL_PREFETCH="0")
    assert result["status"] == "completed", result
    (sent,) = weights_requests(hub_server, hub_model)
    assert sent > train_loading(demo_volume, "not-prefetched")
    assert not (demo_volume / "runs" / "not-prefetched" / "logs" / "prefetch.log").exists()


def test_a_failed_prefetch_only_loses_the_overlap(demo_volume, hub_server, hub_model):
    hub_server.fail_next("/model.safetensors", 403, times=1)  # the prefetch's request for the weights
    result = run(demo_volume, hub_server, hub_model, "prefetch-failed")
    assert result["status"] == "completed", result
    log = (demo_volume / "runs" / "prefetch-failed" / "logs" / "prefetch.log").read_text()
    assert f"prefetch of {hub_model} failed" in log
    (sent,) = weights_requests(hub_server, hub_model)  # the train child fetched what was missing
    assert sent > train_loading(demo_volume, "prefetch-failed")


def test_a_cancelled_job_leaves_no_download_running(demo_volume, hub_server, hub_model):
    from worker.job.supervisor import StopSignal

    hub_server.file_bytes_per_s = 64 * 1024  # the weights take ~25 s: the download is running when the job stops
    stop, results = StopSignal(), []
    try:
        job = threading.Thread(target=lambda: results.append(run(demo_volume, hub_server, hub_model, "cut", stop=stop)))
        job.start()
        deadline = time.monotonic() + 120
        while not weights_requests(hub_server, hub_model) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert weights_requests(hub_server, hub_model), "the prefetch never asked for the weights"
        stop.request("cancelled")
        job.join(timeout=120)
    finally:
        hub_server.file_bytes_per_s = None
    assert results and results[0]["status"] == "cancelled", results
    assert not left_behind(lambda _, cmdline: "worker.job.prefetch" in cmdline and hub_model in cmdline)


def test_the_wait_shows_the_bytes_downloaded_so_far(tmp_path, hub_server, hub_model, tiny_model_dir):
    from schemas.config import TrainingConfig
    from schemas.secrets import Redactor
    from worker.job.prefetch import WAITING, ModelPrefetch
    from worker.job.supervisor import StopSignal
    from worker.job.updates import format_line

    endpoint, token = hub_server
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf")}
    data = [{"path": "org/data", "type": "alpaca"}]
    cfg = TrainingConfig.model_validate({"base_model": hub_model, "learning_rate": 1e-4, "datasets": data})
    hub_server.file_bytes_per_s = 512 * 1024  # the weights (1.6 MiB) take ~3 s: ~6 progress lines, 2 a second
    updates: list[dict] = []
    try:
        prefetch = ModelPrefetch.start(cfg, env, tmp_path / "prefetch.log", Redactor([token]))
        assert prefetch is not None and prefetch.wait(StopSignal(), updates.append, "run-1")
        prefetch.close()
    finally:
        hub_server.file_bytes_per_s = None
    assert updates[0]["message"] == WAITING and updates[0]["stage"] == "train"
    counted = [u for u in updates if "bytes_done" in u]
    fetched = files_to_fetch([p.name for p in tiny_model_dir.iterdir()])
    assert len(counted) >= 3 and {u["bytes_total"] for u in counted} == {
        sum((tiny_model_dir / n).stat().st_size for n in fetched)
    }
    done = [u["bytes_done"] for u in counted]
    assert done == sorted(done) and done[0] < done[-1] <= counted[-1]["bytes_total"]
    assert "base model" in format_line(counted[-1]) and "MiB" in format_line(counted[-1])
    log = (tmp_path / "prefetch.log").read_text()
    assert "prefetched" in log and "bytes " not in log  # progress lines are not kept in the log


def test_the_files_are_the_config_and_one_weights_format():
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "original/consolidated.pth", "README.md"]
    assert files_to_fetch(repo) == ["config.json", "model.safetensors"]
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert files_to_fetch([*shards, "tokenizer.json", "original/params.json"]) == sorted([*shards, "tokenizer.json"])
    assert files_to_fetch(["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]
    mistral = ["consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert files_to_fetch([*mistral, "params.json"]) == [*mistral[1:], "params.json"]  # not the second copy
    assert files_to_fetch(["weights.safetensors", "config.json"]) == ["config.json", "weights.safetensors"]

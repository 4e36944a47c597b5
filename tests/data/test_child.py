"""The preprocess child as the orchestrator runs it (`python -m worker.data CONFIG_JSON`), with
real processes and signals: kill -9 mid-build leaves no complete cache and the next run rebuilds;
two runs at once make one cache and both succeed. And `ftw preprocess` exit codes and output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import child_env
from tests.data.helpers import alpaca_rows, config, write_jsonl
from worker.cli import main as ftw
from worker.data.cache import read_manifest
from worker.data.prepared import PreparedCache

pytestmark = pytest.mark.slow


def start_child(volume, cfg, name, **env_extra):
    config_json = volume / f"{name}.json"
    config_json.write_text(cfg.model_dump_json())
    env = child_env(
        BASE_VOLUME=str(volume),
        FTW_EVENTS=str(volume / f"{name}.events"),
        FTW_ERROR_FILE=str(volume / f"{name}.error"),
        OMP_NUM_THREADS="1",
        **env_extra,
    )
    output = volume / f"{name}.prepared.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "worker.data", str(config_json), "--output", str(output)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child.output = output  # type: ignore[attr-defined]
    return child


def reported(child) -> dict:
    """What the child reported in its output file (PreparedCache), as {"cache_dir", **summary}."""
    prepared = PreparedCache.read(child.output)
    assert prepared is not None, f"no PreparedCache in {child.output}"
    return {"cache_dir": str(prepared.cache_dir), **prepared.summary}


def events(volume, name):
    path = volume / f"{name}.events"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_kill_9_mid_build_leaves_no_complete_cache_and_next_run_rebuilds(volume, tokenizer_dir):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(5000))
    cfg = config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}], dataset_num_proc=1)
    child = start_child(volume, cfg, "killed")
    deadline = time.monotonic() + 240
    while not any(e.get("phase") == "tokenize" for e in events(volume, "killed")):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child never reached tokenisation"
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    cache = volume / "cache"
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kill did not land during the build"
    assert not [p for p in cache.iterdir() if not p.name.startswith(".") and p.is_dir() and read_manifest(p)]
    rerun = start_child(volume, cfg, "rerun")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    summary = reported(rerun)
    assert summary["built"] and summary["rows"]["train"] == 5000
    assert read_manifest(volume / "cache" / summary["cache_dir"])
    assert not [
        p for p in cache.iterdir() if p.name.startswith((".tmp-", ".scratch-"))
    ]  # the dead builder's folders are gone


def test_two_concurrent_runs_make_one_cache_and_both_succeed(volume, tokenizer_dir):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(1000))
    cfg = config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}], dataset_num_proc=1, sample_packing=True)
    children = [start_child(volume, cfg, f"run{i}") for i in range(2)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(reported(child))
    assert results[0]["cache_dir"] == results[1]["cache_dir"]
    assert sorted(r["built"] for r in results) == [False, True]
    entries = sorted(p.name for p in (volume / "cache").iterdir() if not p.name.endswith(".lock"))
    assert entries == [os.path.basename(results[0]["cache_dir"])]
    assert any(e["phase"] == "done" for e in events(volume, "run0"))
    builder = next(i for i, r in enumerate(results) if r["built"])
    progress = [e for e in events(volume, f"run{builder}") if e["phase"] == "tokenize" and "eta_s" in e]
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 1000 and progress[-1]["tokens_per_s"] > 0


def test_ftw_preprocess_cli(volume, tokenizer_dir, capsys, monkeypatch):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(20))
    good = volume / "good.yml"
    good.write_text(
        f"base_model: {tokenizer_dir}\nlearning_rate: 0.0001\nsequence_len: 128\n"
        f"datasets:\n  - path: {path}\n    type: alpaca\n"
    )
    monkeypatch.setenv("FTW_ALLOWED_PATHS", str(tokenizer_dir))
    assert ftw(["preprocess", str(good)]) == 0
    out = capsys.readouterr().out
    assert "rows in  20 (20 samples)" in out and "trained tokens" in out
    assert json.loads(out.strip().splitlines()[-1])["rows"]["train"] == 20
    bad_data = volume / "bad.jsonl"
    bad_data.write_text('{"instruction": "a"}\n')
    bad = volume / "bad.yml"
    bad.write_text(good.read_text().replace(str(path), str(bad_data)))
    assert ftw(["preprocess", str(bad)]) == 1
    assert "bad.jsonl: row 0: field 'output'" in capsys.readouterr().err
    invalid = volume / "invalid.yml"
    invalid.write_text(good.read_text().replace("learning_rate: 0.0001", "learning_rate: -1"))
    assert ftw(["preprocess", str(invalid)]) == 3
    assert ftw(["preprocess"]) == 2


def finish(child) -> dict:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    return reported(child)


def test_hub_dataset_is_fingerprinted_by_its_revision(volume, tokenizer_dir, hub_server):  # noqa: F811
    """Real huggingface_hub + datasets clients against the local Hub (HF_ENDPOINT)."""
    from huggingface_hub import HfApi

    endpoint, token = hub_server
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo("data-tests/alpaca", repo_type="dataset", private=True)

    def push(rows):
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return api.upload_file(
            path_or_fileobj=body, path_in_repo="train.jsonl", repo_id="data-tests/alpaca", repo_type="dataset"
        ).oid

    first_sha = push(alpaca_rows(7))
    cfg = config(tokenizer_dir, [{"path": "data-tests/alpaca", "type": "alpaca"}])
    hub_env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(volume / "hf-home")}
    first = finish(start_child(volume, cfg, "hub1", **hub_env))
    assert first["rows"]["train"] == 7 and first["sources"][0]["content_id"] == f"hub:data-tests/alpaca@{first_sha}"
    push(alpaca_rows(9, seed=1))
    # the three runs after the second push are independent of one another: they run at once
    latest = start_child(volume, cfg, "hub2", **hub_env)
    pinned_cfg = cfg.model_copy(update={"datasets": [cfg.datasets[0].model_copy(update={"revision": first_sha})]})
    pinned_child = start_child(volume, pinned_cfg, "hub3", **hub_env)
    no_token = start_child(volume, cfg, "hub4", HF_ENDPOINT=endpoint, HF_HOME=str(volume / "hf-home2"))
    second = finish(latest)
    assert second["built"] and second["rows"]["train"] == 9 and second["cache_dir"] != first["cache_dir"]
    pinned = finish(pinned_child)
    assert pinned["rows"]["train"] == 7 and pinned["sources"] == first["sources"]
    _, err = no_token.communicate(timeout=300)
    assert no_token.returncode == 1
    error = json.loads((volume / "hub4.error").read_text())
    assert error["code"] == "data" and "data-tests/alpaca: cannot resolve this Hub dataset" in error["message"]
    assert token not in err and token not in json.dumps(error)

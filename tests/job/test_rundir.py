"""Before any work: invalid jobs, path escapes, symlinks planted in the volume, concurrent run_ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from schemas.job import validate_job
from schemas.paths import resolve_local_path
from tests.conftest import child_env
from tests.job.conftest import example_job
from worker.checks import gpu as checks_gpu
from worker.checks import stage as checks_stage
from worker.job.pipeline import run_job


@pytest.fixture
def no_children(monkeypatch):
    """Any attempt to start a process fails the test."""

    def refuse(*a, **k):
        raise AssertionError(f"a child process was started: {a[:1]}")

    monkeypatch.setattr(checks_gpu.subprocess, "Popen", refuse)
    monkeypatch.setattr("worker.job.supervisor.subprocess.Popen", refuse)


def test_invalid_job_fails_fast_listing_every_problem(volume, no_children):
    job = example_job(run_id="bad id", config={"learning_rate": -1, "lora_r": 0, "micro_batch_size": "many"})
    job["outputs"] = {"s3": {"bucket": "X"}}
    started = time.monotonic()
    result = run_job({"input": job})
    assert time.monotonic() - started < 1.0
    assert result["status"] == "failed" and result["error"]["code"] == "invalid_job"
    locs = {e["loc"] for e in result["error"]["details"]["errors"]}
    assert {"run_id", "config.learning_rate", "config.lora_r", "config.micro_batch_size", "outputs.s3.bucket"} <= locs
    assert list(volume.iterdir()) == []  # no run dir, nothing at all


RUN_ID_CORPUS = [
    "..",
    "../evil",
    "/abs",
    "a/b",
    "a\\b",
    "a\x00b",
    "ｅｖｉｌ",
    "evil\u2215x",
    "\u202eevil",
    "evil\n",
    "a" * 65,
    "",
    ".hidden",
    "-x",
    " x",
]


@pytest.mark.parametrize("run_id", RUN_ID_CORPUS)
def test_run_id_corpus_never_names_a_folder(volume, no_children, run_id):
    result = run_job({"input": example_job(run_id=run_id)})
    assert result["error"]["code"] == "invalid_job"
    assert any(e["loc"] == "run_id" for e in result["error"]["details"]["errors"])
    assert list(volume.iterdir()) == []


PATH_FIELDS = [
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "dataset_prepared_path",
    "resume_from_checkpoint",
    "datasets[0].path",
    "datasets[0].data_files[0]",
]
PATH_CORPUS = [
    "../../etc/passwd",
    "/etc/passwd",
    "./../outside",
    "file:///etc/passwd",
    "file://host/etc",
    "~/x",
    "./data/\x00x",
    "./link/passwd",
    "..\\..\\etc",
    "./data/../../etc",
    "./data/\u2025/x",
    "./data/\uff0e\uff0e/x",
    "./d\u202eata/x",
]


def set_field(job: dict, field: str, value: str) -> None:
    if field.startswith("datasets[0]."):
        ds = job["config"]["datasets"][0]
        key = field.removeprefix("datasets[0].")
        if key == "data_files[0]":
            ds["data_files"] = [value]
        else:
            ds[key] = value
    else:
        job["config"][field] = value


@pytest.mark.parametrize("field", PATH_FIELDS)
def test_path_corpus_is_refused_or_stays_inside(volume, tmp_path, field):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("secret")
    (volume / "link").symlink_to(outside)  # a symlink planted in BASE_VOLUME
    env = {"BASE_VOLUME": str(volume)}
    for value in PATH_CORPUS:
        job = example_job(config={"lora_model_dir": None})
        set_field(job, field, value)
        report = validate_job({"input": job}, env=env)
        if report.valid:  # accepted: then it must name something inside the volume
            assert "\x00" not in value
            assert volume in resolve_local_path(value, env).parents, (field, value)
        else:
            root = field.split("[")[0].split(".")[0]
            assert any(root in e.loc for e in report.errors), (field, value, report.errors)


@pytest.fixture
def stop_at_gpu_probe(monkeypatch):
    """Jobs stop at the GPU probe (every device hidden, CPU not allowed): after the run folder is written."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("FTW_ALLOW_CPU")


def test_an_endpoint_that_forbids_cpu_runs_refuses_a_job_that_asks_for_one(demo_volume, stop_at_gpu_probe, monkeypatch):
    monkeypatch.setenv("FTW_ALLOW_CPU", "0")
    result = run_job({"input": example_job(allow_cpu=True)})
    assert result["error"]["code"] == "infra" and result["error"]["stage"] == "checks"
    assert "FTW_ALLOW_CPU=0" in result["error"]["hint"]


def test_output_dir_is_pinned_inside_the_run(demo_volume, tmp_path, stop_at_gpu_probe):
    outside = tmp_path / "elsewhere"
    result = run_job({"input": example_job(allow_cpu=False, config={"output_dir": str(outside)})})
    assert result["error"]["stage"] == "checks" and "hides every device" in result["error"]["message"]
    config = json.loads((demo_volume / "runs" / "demo-tiny-lora" / "config.json").read_text())
    assert config["output_dir"] == str(demo_volume / "runs" / "demo-tiny-lora")
    assert not outside.exists() and result["run_id"] == "demo-tiny-lora"


@pytest.mark.parametrize("plant", ["run", "runs"])
def test_symlink_planted_in_the_volume_is_not_followed(volume, tmp_path, plant, no_children):
    outside = tmp_path / "outside"
    outside.mkdir()
    if plant == "runs":
        (volume / "runs").symlink_to(outside)
    else:
        (volume / "runs").mkdir()
        (volume / "runs" / "demo-tiny-lora").symlink_to(outside)
    result = run_job({"input": example_job()})
    assert result["error"]["code"] == "infra" and "symlink" in (result["error"]["message"] + result["error"]["hint"])
    assert list(outside.iterdir()) == []


def test_same_run_id_twice_at_once_the_second_fails_clearly(demo_volume):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from worker.job.rundir import open_run_dir; "
            "open_run_dir(Path(sys.argv[1]), 'demo-tiny-lora'); print('locked', flush=True); time.sleep(60)",
            str(demo_volume),
        ],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        result = run_job({"input": example_job()})
        assert result["error"]["code"] == "run_in_use" and result["error"]["retryable"]
        assert f"pid {holder.pid}" in result["error"]["message"]
        assert not (demo_volume / "runs" / "demo-tiny-lora" / "job.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_resubmitting_a_run_with_another_config_is_refused(demo_volume, stop_at_gpu_probe):
    first = run_job({"input": example_job(allow_cpu=False)})
    assert first["error"]["code"] == "infra"
    result_json = demo_volume / "runs" / "demo-tiny-lora" / "result.json"
    kept = result_json.read_bytes()
    result = run_job({"input": example_job(allow_cpu=False, config={"learning_rate": 0.5})})
    assert result["error"]["code"] == "invalid_job" and "learning_rate" in result["error"]["message"]
    assert result_json.read_bytes() == kept  # a refused job leaves the run's own result as it was

    from worker.job.rundir import open_run_dir

    run = open_run_dir(demo_volume, "demo-tiny-lora")
    run.mark_done("preprocess", {"cache_dir": str(demo_volume / "cache" / "x"), "summary": {}})
    run.close()
    result = run_job({"input": example_job(allow_cpu=False, resume=False)})
    assert result["error"]["code"] == "invalid_job" and "resume: false" in result["error"]["message"]
    assert result_json.read_bytes() == kept


def test_unwritable_volume_fails_before_any_work(tmp_path):
    if os.geteuid() == 0 and subprocess.run(["unshare", "-r", "true"], capture_output=True).returncode != 0:
        pytest.skip("root ignores file modes and no user namespace is available to drop that")
    ro = tmp_path / "ro"
    ro.mkdir()
    code = (
        "import json, os, sys; from worker.job.pipeline import run_job; "
        "print(json.dumps(run_job({'input': json.loads(sys.argv[1])})))"
    )
    env = child_env(BASE_VOLUME=str(ro), FTW_ALLOW_CPU="1")
    script = f'mount -t tmpfs -o size=1m,ro tmpfs {ro} && exec {sys.executable} -c "$0" "$1"'
    out = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script, code, json.dumps(example_job())],
        capture_output=True,
        text=True,
        env=env,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"]["code"] == "infra" and "Read-only file system" in result["error"]["message"], out.stderr
    assert "writable" in result["error"]["hint"]


def test_a_bug_in_the_orchestrator_still_gives_the_failure_shape_and_frees_the_run(demo_volume, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError(f"unexpected, token {os.environ['HF_TOKEN']}")

    monkeypatch.setenv("HF_TOKEN", "hf_bugReportSecret99")
    monkeypatch.setattr(checks_stage, "estimate_disk", broken)
    result = run_job({"input": example_job()})
    assert (
        result["status"] == "failed"
        and result["error"]["code"] == "error"
        and "RuntimeError" in result["error"]["message"]
    )
    assert "hf_bugReportSecret99" not in json.dumps(result) + capsys.readouterr().err
    from worker.job.rundir import open_run_dir

    open_run_dir(demo_volume, "demo-tiny-lora").close()  # the lock was released


def test_a_probe_of_another_job_in_this_process_is_not_a_read_only_volume(tmp_path):
    """Jobs run in threads of one process (several handler jobs, concurrent resubmits): each probes the
    run folder with its own file, so another's probe in flight is not taken for an unwritable volume."""
    from worker.job.rundir import open_run_dir

    folder = tmp_path / "runs" / "same"
    folder.mkdir(parents=True)
    (folder / f".ftw-probe-{os.getpid()}").write_text("another thread's probe, right now")
    run = open_run_dir(tmp_path, "same")
    run.close()

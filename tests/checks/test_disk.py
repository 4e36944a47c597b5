"""Disk estimate against a real small filesystem: a 16 MiB tmpfs mounted as BASE_VOLUME inside a user
+ mount namespace (`unshare -r -m`), so the free-space figure is the kernel's, not a stub."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from schemas.job import validate_job
from tests.conftest import child_env
from tests.job.conftest import EXAMPLE_DATA, example_job
from worker.checks.disk import estimate_disk
from worker.estimate.shapes import local_model_shape

MOUNT_OK = (
    subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True
    ).returncode
    == 0
)
needs_mount = pytest.mark.skipif(not MOUNT_OK, reason="this machine allows no user+mount namespace for a small tmpfs")


def test_model_shape_matches_the_real_checkpoint(tiny_model_dir):
    shape = local_model_shape(tiny_model_dir)
    weights = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert shape.bytes_on_disk == weights
    assert abs(shape.params * 4 - weights) / weights < 0.01  # fp32 tiny model: params from config.json ≈ file size / 4


def test_estimate_counts_checkpoints_by_save_total_limit(tiny_model_dir, volume, monkeypatch):
    monkeypatch.setenv("FTW_ALLOWED_PATHS", str(tiny_model_dir))
    job = example_job(config={"base_model": str(tiny_model_dir)})
    two = estimate_disk(validate_job({"input": job}).value.config, {"BASE_VOLUME": str(volume)})[0]
    job["config"]["save_total_limit"] = 4
    four = estimate_disk(validate_job({"input": job}).value.config, {"BASE_VOLUME": str(volume)})[0]
    assert four.parts["checkpoints"] == 2 * two.parts["checkpoints"] > 0
    assert "base_model_download" not in two.parts  # a local model costs no download


@needs_mount
def test_not_enough_disk_fails_before_preprocessing_with_the_numbers(tmp_path, tiny_model_dir):
    volume = tmp_path / "volume"
    volume.mkdir()
    full = example_job(
        run_id="full-ft",
        config={
            "base_model": str(tiny_model_dir),
            "adapter": None,
            "lora_r": 8,
            "lora_alpha": None,
            "lora_target_linear": None,
            "save_total_limit": 10,
        },
    )
    lora = example_job(run_id="lora", config={"base_model": str(tiny_model_dir)})
    probe = (
        "import json, sys; from pathlib import Path; from schemas.job import validate_job; "
        "from worker.checks.disk import estimate_disk, check_disk; from worker.errors import InfraError; out = {}\n"
        "for job in json.loads(sys.argv[1]):\n"
        "    est = estimate_disk(validate_job({'input': job}).value.config, {'BASE_VOLUME': sys.argv[2]})[0]\n"
        "    try: check_disk(est, Path(sys.argv[2])); out[job['run_id']] = 'fits'\n"
        "    except InfraError as e: out[job['run_id']] = e.message\n"
        "print(json.dumps(out))"
    )
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"input": full}))
    py = shlex.quote(sys.executable)
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {volume} && mkdir {volume}/data && cp {EXAMPLE_DATA} {volume}/data/ && "
        f"{py} -c {shlex.quote(probe)} {shlex.quote(json.dumps([full, lora]))} {volume} && "
        f"{py} -m worker.cli run --quiet {job_file}; echo exit=$?; ls -R {volume}/runs"
    )
    env = child_env(BASE_VOLUME=str(volume), FTW_ALLOW_CPU="1", FTW_ALLOWED_PATHS=str(tiny_model_dir))
    out = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    lines = out.stdout.splitlines()
    verdicts, result = json.loads(lines[0]), json.loads(lines[1])
    assert verdicts["lora"] == "fits", verdicts
    assert "not enough disk" in verdicts["full-ft"]
    error = result["error"]
    assert result["status"] == "failed" and error["code"] == "infra" and error["stage"] == "checks"
    assert "needs about" in error["message"] and "but only" in error["message"] and "checkpoints" in error["message"]
    details = error["details"]
    assert details["total_bytes"] > details["free_bytes"] and 15 << 20 < details["free_bytes"] <= 16 << 20
    assert "exit=1" in out.stdout
    assert "preprocess" not in out.stdout.split("exit=1")[1]  # no stage log folder: nothing was started

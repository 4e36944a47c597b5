"""`ftw train` picks its run folder as docs/config.md says and reuses it only for the same config:
another config's training there is refused before preprocessing or model load (exit 3, the
changed keys named), a finished run is reported as done, an interrupted one resumes; output_dir
names the run folder (relative: under BASE_VOLUME), without a warning that it is not used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.train.helpers import base_config
from worker import cli

pytestmark = pytest.mark.timeout(300)


def main(argv: list[str]) -> int:
    """`ftw train ARGV`."""
    return cli.main(["train", *argv])


@pytest.fixture
def train_env(volume, task_model_dir, monkeypatch, tmp_path) -> Path:
    """BASE_VOLUME with a small completion dataset."""
    with (volume / "digits.jsonl").open("w") as f:
        for n in range(64):
            f.write(json.dumps({"text": " ".join(f"{n:03d}") + " -> done"}) + "\n")
    for key, value in {
        "FTW_ALLOWED_PATHS": str(task_model_dir),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),  # the stage children import this tree, not the shared venv's install, from tmp_path
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return volume


def write_config(path: Path, model_dir: Path, **over) -> Path:
    digits = {"datasets": [{"path": "./digits.jsonl", "type": "completion"}], "max_steps": 2, "save_steps": 1}
    cfg = base_config(model_dir, **{**digits, "sequence_len": 32, **over})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage_attempts(run_dir: Path) -> list[str]:
    """Every stage child started in the run folder (each gets logs/<stage>/attempt-N)."""
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "logs").glob("*/attempt-*"))


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_run_folder_is_reused_only_by_the_config_that_made_it(train_env, task_model_dir, volume, tmp_path, capfd):
    first = write_config(tmp_path / "cfg" / "long.yml", task_model_dir)
    assert main([str(first)]) == 0, capfd.readouterr().err
    run_dir = volume / "runs" / "long"
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["run_dir"] == str(run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    done, events = snapshot(run_dir), stage_attempts(run_dir)

    # the same file name, another config (the user's lora_r 16): refused before any work
    other = write_config(tmp_path / "cfg" / "x" / "long.yml", task_model_dir, lora_r=16)
    assert main([str(other)]) == 3
    err = capfd.readouterr().err
    assert f"run folder {run_dir} holds training of a different config (changed: lora_r)" in err
    assert "--run-dir" in err and "size mismatch" not in err
    # only the learning rate changed: refused too, never silently resumed
    assert main([str(write_config(tmp_path / "lr" / "long.yml", task_model_dir, learning_rate=5e-4))]) == 3
    assert "(changed: learning_rate)" in capfd.readouterr().err
    assert snapshot(run_dir) == done and stage_attempts(run_dir) == events  # no stage child started

    # the original config again: already done, its result printed, nothing redone
    assert main([str(first)]) == 0
    out, err = capfd.readouterr()
    assert "already finished this config (2 steps)" in err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
    assert snapshot(run_dir) == done and stage_attempts(run_dir) == events

    # stopped after its last checkpoint: another config is still refused, its own config resumes
    for name in ("summary.json", "adapter"):
        shutil.rmtree(run_dir / name) if name == "adapter" else (run_dir / name).unlink()
    assert main([str(other)]) == 3
    assert "(changed: lora_r)" in capfd.readouterr().err and not (run_dir / "adapter").exists()
    assert main([str(first)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].startswith("checkpoint-")


def test_output_dir_is_the_run_folder_and_relative_means_under_base_volume(
    train_env, task_model_dir, volume, tmp_path, capfd
):
    config = write_config(tmp_path / "cfg.yml", task_model_dir, output_dir="./outputs/lora-out")
    assert main([str(config)]) == 0
    out, err = capfd.readouterr()
    run_dir = volume / "outputs" / "lora-out"
    assert json.loads(out.strip().splitlines()[-1])["run_dir"] == str(run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "outputs").exists()  # never under the current folder
    assert not [
        line for line in err.splitlines() if line.startswith("warning")
    ]  # not "output_dir is set by ftw": it is used
    assert json.loads((run_dir / "config.json").read_text())["output_dir"] == str(run_dir)


@pytest.mark.timeout(600)
def test_sigterm_stops_after_a_checkpoint_with_exit_75_and_the_same_command_resumes(
    train_env, task_model_dir, volume, tmp_path
):
    """ftw train runs the job path: SIGTERM reaches the train child through the supervisor, which
    lets it save first; the same command then continues from that checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # long enough that the SIGTERM lands mid-run (it did at step ~8, a checkpoint every step), short enough
    # that the resumed run's remaining steps are few
    config = write_config(tmp_path / "long.yml", task_model_dir, max_steps=60)
    run_dir = volume / "runs" / "long"
    argv = [sys.executable, "-m", "worker.cli", "train", str(config)]
    proc = subprocess.Popen(argv, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "checkpoints").glob("checkpoint-*/ftw_state.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "stopped after saving a checkpoint; run the same command again to resume" in err
    assert not (run_dir / "adapter").exists() and out == ""

    again = subprocess.run(argv, env=dict(os.environ), capture_output=True, text=True, timeout=280)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].startswith("checkpoint-")

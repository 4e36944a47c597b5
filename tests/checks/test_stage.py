"""run_checks, the checks stage's one entry: the typed report the orchestrator keeps (the GPUs and the
env that shows the children exactly those, the disk and memory records), and the env each check reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import TrainingConfig
from schemas.validate import validate_config
from tests.checks.test_gpu_probe import fake_smi
from worker.checks import CheckInput, run_checks
from worker.errors import JobSpecError


def config(volume: Path, **over: object) -> TrainingConfig:
    raw = {
        "base_model": "./models/ftw-tiny-chatml",
        "datasets": [{"path": "./data/greetings.jsonl", "type": "chat_template"}],
        "adapter": "lora",
        "lora_target_linear": True,
        "learning_rate": 1e-3,
        **over,
    }
    report = validate_config(raw, {"BASE_VOLUME": str(volume)})
    assert report.valid, report.errors
    return report.value


def test_a_cpu_run_reports_no_gpu_and_hides_every_device_from_the_children(demo_volume: Path, tmp_path: Path) -> None:
    env = {"BASE_VOLUME": str(demo_volume), "PATH": str(tmp_path)}  # no nvidia-smi
    heard: list[str] = []
    report = run_checks(CheckInput(config(demo_volume), env, env, demo_volume, allow_cpu=True), heard.append)
    assert report.gpus.cpu_only and report.gpus.count == 0 and heard == ["devices: CPU only"]
    assert report.gpu_env["CUDA_VISIBLE_DEVICES"] == ""
    assert report.prediction is not None and report.memory == {"checked": False, "reason": "no GPU"}
    record = report.as_dict()
    assert record.keys() == {"disk", "gpu", "memory"} and record["disk"]["total_bytes"] > 0
    assert record["gpu"]["cpu_only"] is True and report.warnings == []


def test_probed_gpus_are_checked_against_the_prediction_and_named_for_the_children(
    demo_volume: Path, tmp_path: Path
) -> None:
    env = {**fake_smi(tmp_path), "BASE_VOLUME": str(demo_volume), "CUDA_VISIBLE_DEVICES": "1"}
    heard: list[str] = []
    report = run_checks(CheckInput(config(demo_volume), env, env, demo_volume), heard.append)
    assert [g.index for g in report.gpus.devices] == [1] and heard == ["devices: NVIDIA H200 (143770 MiB free)"]
    assert report.gpu_env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb2222-0000-0000-0000-000000000000"
    assert report.memory["checked"] and report.memory["fits"] and report.memory["gpu"] == "NVIDIA H200"
    # a tiny model's peak leaves the H200 room for what fixed segments cache: the children get them, checks.json says so
    assert report.gpu_env["PYTORCH_CUDA_ALLOC_CONF"] == report.memory["allocator"] == "expandable_segments:False"


def test_the_machine_checks_read_the_childrens_env_and_the_datasets_only_when_still_to_prepare(
    demo_volume: Path, tmp_path: Path
) -> None:
    env = {"BASE_VOLUME": str(demo_volume), "PATH": str(tmp_path), "HOME": str(tmp_path)}
    online = config(demo_volume, wandb_project="p")
    with pytest.raises(JobSpecError, match="WANDB_API_KEY"):
        run_checks(CheckInput(online, env, env, demo_volume, allow_cpu=True))
    with_key = {**env, "WANDB_API_KEY": "k" * 40}  # the job's credentials reach the children, not the worker's env
    run_checks(CheckInput(online, env, with_key, demo_volume, allow_cpu=True))
    (demo_volume / "data" / "greetings.jsonl").unlink()
    with pytest.raises(JobSpecError, match=r"datasets\[0\].path: ./data/greetings.jsonl does not exist"):
        run_checks(CheckInput(config(demo_volume), env, env, demo_volume, allow_cpu=True))
    run_checks(
        CheckInput(config(demo_volume), env, env, demo_volume, allow_cpu=True, datasets=False)
    )  # prepared already

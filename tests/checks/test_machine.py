"""What a config needs from the machine (worker/checks/machine.py), each unmet requirement named with
its fix; `installed` is swapped for a machine with or without a package (no GPU packages here)."""

from __future__ import annotations

import pytest

from schemas.config import TrainingConfig
from schemas.optimizers import OPTIMIZERS
from worker.checks import machine
from worker.checks.machine import check_machine
from worker.errors import JobSpecError


def cfg(**over: object) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {"base_model": "org/m", "learning_rate": 1e-3, "datasets": [{"path": "d.jsonl", "type": "completion"}], **over}
    )


def test_qlora_without_cuda_is_a_clear_error_before_any_stage():
    with pytest.raises(JobSpecError, match="needs a CUDA GPU") as e:
        check_machine(cfg(adapter="qlora", load_in_4bit=True), False, {})
    assert "adapter: lora" in e.value.hint


def test_every_unmet_machine_requirement_is_named_with_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    present = {"bitsandbytes"}
    monkeypatch.setattr(machine, "installed", lambda module: module in present)
    check_machine(cfg(adapter="qlora", load_in_4bit=True), True, {})
    with pytest.raises(JobSpecError) as e:
        check_machine(cfg(attn_implementation="flash_attention_2", wandb_project="p", use_tensorboard=True), True, {})
    assert "flash-attn" in e.value.message and "wandb, tensorboard logging" in e.value.message
    assert "attn_implementation: sdpa" in e.value.hint and "remove the wandb, tensorboard keys" in e.value.hint
    present.clear()
    with pytest.raises(JobSpecError, match="bitsandbytes"):
        check_machine(cfg(adapter="qlora", load_in_4bit=True), True, {})
    assert cfg().trackers() == [] and cfg(use_mlflow=True).trackers() == ["mlflow"]


def test_flash_attention_3_is_checked_by_its_own_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "installed", lambda module: module == "flash_attn")  # flash-attn 2 only
    check_machine(cfg(attn_implementation="flash_attention_2"), True, {})
    with pytest.raises(JobSpecError, match="needs the flash-attn-3 package"):
        check_machine(cfg(attn_implementation="flash_attention_3"), True, {})


def test_online_wandb_without_a_key_is_refused_offline_or_with_a_key_is_not(tmp_path):
    online = cfg(wandb_project="p")
    with pytest.raises(JobSpecError, match="WANDB_API_KEY") as e:
        check_machine(online, False, {"HOME": str(tmp_path)})
    assert "wandb_mode: offline" in e.value.hint and "credentials.wandb_api_key" in e.value.hint
    check_machine(online, False, {"HOME": str(tmp_path), "WANDB_API_KEY": "k" * 40})
    check_machine(cfg(wandb_project="p", wandb_mode="offline"), False, {"HOME": str(tmp_path)})
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    check_machine(online, False, {"HOME": str(tmp_path)})


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_passes_on_a_machine_with_what_it_needs(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry's requirements are what the checks ask for: met, it passes; one missing, it is named."""
    spec = OPTIMIZERS[name]
    present = set(spec.packages)
    monkeypatch.setattr(machine, "installed", lambda module: module in present)
    check_machine(cfg(optimizer=name), True, {})
    if spec.needs_cuda:
        with pytest.raises(
            JobSpecError, match=f"optimizer {name} needs .* on a CUDA GPU, and this machine has no CUDA"
        ):
            check_machine(cfg(optimizer=name), False, {})
    else:
        check_machine(cfg(optimizer=name), False, {})
    for package in spec.packages:
        present.discard(package)
        with pytest.raises(JobSpecError, match=f"this machine has no {package}") as e:
            check_machine(cfg(optimizer=name), True, {})
        assert e.value.hint == "use optimizer: adamw_torch_fused"


def test_fp8_base_weights_needs_a_gpu_of_compute_capability_8_9() -> None:
    fp8 = cfg(adapter="lora", fp8_base_weights=True)
    with pytest.raises(JobSpecError, match="fp8_base_weights needs a CUDA GPU") as e:
        check_machine(fp8, False, {})
    assert "remove fp8_base_weights" in e.value.hint
    with pytest.raises(JobSpecError, match="compute capability 8.9 or more, and this GPU has 8.0") as e:
        check_machine(fp8, True, {}, capabilities=["9.0", "8.0"])
    assert "H100" in e.value.hint
    for cap in ("8.9", "9.0", "10.0", ""):  # unknown: the train stage checks with torch
        check_machine(fp8, True, {}, capabilities=[cap])
    with pytest.raises(JobSpecError, match="trains on one GPU .* this job sees 2") as e:
        check_machine(fp8, True, {}, capabilities=["9.0", "9.0"])
    assert "one-GPU worker" in e.value.hint
    check_machine(cfg(adapter="lora"), True, {}, capabilities=["7.5"])  # only fp8 asks

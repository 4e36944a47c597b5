"""The GPU probe. No GPU here, so `nvidia-smi` is a script that prints what the real one prints
(the same CSV query output); the probe still runs it as a real child with its real timeout.
bench/gpu_worker.sh runs the same probe against a real nvidia-smi on an H200."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from worker.checks.gpu import (
    CACHING,
    CACHING_HEADROOM,
    EXPANDABLE,
    cpu_allowed,
    parse_visible_devices,
    probe,
    stage_env,
)
from worker.errors import InfraError
from worker.estimate.devices import CONTEXT_HEADROOM

GPUS = """0, GPU-aaaa1111-0000-0000-0000-000000000000, NVIDIA H200, 143771, 1, 143770, 570.124.06, 9.0
1, GPU-bbbb2222-0000-0000-0000-000000000000, NVIDIA H200, 143771, 1, 143770, 570.124.06, 9.0
"""


def fake_smi(tmp_path: Path, gpus: str = GPUS, apps: str = "", gpu_cmd: str = "") -> dict[str, str]:
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  --query-gpu=*) {gpu_cmd or 'cat <<EOF'}\n{'' if gpu_cmd else gpus + 'EOF'}\n;;\n"
        f"  --query-compute-apps=*) cat <<EOF\n{apps}EOF\n;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return {"FTW_NVIDIA_SMI": str(script), "PATH": os.environ["PATH"]}


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", []),
        ("-1", []),
        ("0", ["0"]),
        ("1,0", ["1", "0"]),
        ("GPU-bbbb", ["GPU-bbbb"]),
    ],
)
def test_visible_devices_parse(value, expected):
    assert parse_visible_devices(value) == expected


@pytest.mark.parametrize("value", ["0,0", "gpu0", "0,,1"])
def test_visible_devices_rejects_nonsense(value):
    with pytest.raises(InfraError):
        parse_visible_devices(value)


def test_probe_selects_by_index_and_uuid_prefix(tmp_path):
    env = fake_smi(tmp_path)
    everything = probe(env)
    assert everything.count == 2 and everything.devices[0].name == "NVIDIA H200" and everything.driver == "570.124.06"
    assert [d.index for d in probe({**env, "CUDA_VISIBLE_DEVICES": "1"}).devices] == [1]
    chosen = probe({**env, "CUDA_VISIBLE_DEVICES": "GPU-bbbb2222"})
    assert [d.index for d in chosen.devices] == [1]
    assert stage_env(chosen, {})["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb2222-0000-0000-0000-000000000000"
    assert stage_env(chosen, {})["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # no predicted peak


def test_the_children_get_fixed_segments_only_where_the_predicted_peak_leaves_room_for_what_they_cache(tmp_path):
    """torch's fixed segments (fast on varying shapes) where the peak × CACHING_HEADROOM fits the tightest device,
    expandable ones (reserved ≈ allocated) where it does not or nothing was predicted; the operator's setting wins."""
    gpus = probe(fake_smi(tmp_path))
    free = min(d.free_mib for d in gpus.devices) << 20
    roomy = int((free - CONTEXT_HEADROOM) / CACHING_HEADROOM)
    allocator = "PYTORCH_CUDA_ALLOC_CONF"
    assert stage_env(gpus, {}, roomy)[allocator] == CACHING == "expandable_segments:False"
    assert stage_env(gpus, {}, roomy + (1 << 20))[allocator] == EXPANDABLE
    assert stage_env(gpus, {}, None)[allocator] == EXPANDABLE
    # a vLLM engine beside the trainer (trl.use_vllm) takes its share of the GPU first
    total = min(d.total_mib for d in gpus.devices) << 20
    beside = int((free - 0.3 * total - CONTEXT_HEADROOM) / CACHING_HEADROOM)
    assert stage_env(gpus, {}, roomy, engine_share=0.3)[allocator] == EXPANDABLE
    assert stage_env(gpus, {}, beside, engine_share=0.3)[allocator] == CACHING
    for name in (allocator, "PYTORCH_ALLOC_CONF"):  # the operator's, by either of torch's names
        operator = {name: "backend:cudaMallocAsync"}
        assert stage_env(gpus, operator, roomy)[allocator] == stage_env(gpus, operator)[allocator] == operator[name]


def test_probe_reads_the_compute_capability_where_nvidia_smi_gives_it(tmp_path):
    """fp8_base_weights needs 8.9 or more (worker/checks/machine.py); a row without the column reads as unknown."""
    assert [d.compute_capability for d in probe(fake_smi(tmp_path)).devices] == ["9.0", "9.0"]
    old = "0, GPU-aaaa1111-0000-0000-0000-000000000000, NVIDIA A100, 81920, 1, 81919, 535.1\n"
    assert [d.compute_capability for d in probe(fake_smi(tmp_path, gpus=old)).devices] == [""]


def test_nonexistent_device_fails_in_seconds_naming_what_exists(tmp_path):
    started = time.monotonic()
    with pytest.raises(InfraError) as e:
        probe({**fake_smi(tmp_path), "CUDA_VISIBLE_DEVICES": "7"})
    assert time.monotonic() - started < 3
    assert "'7'" in e.value.message and "2 GPU(s) found" in e.value.message and "GPU-aaaa1111" in e.value.message


def test_hung_driver_costs_the_timeout_not_the_job(tmp_path):
    env = {**fake_smi(tmp_path, gpu_cmd="exec sleep 600"), "FTW_GPU_PROBE_TIMEOUT_S": "1"}
    started = time.monotonic()
    with pytest.raises(InfraError) as e:
        probe(env)
    assert time.monotonic() - started < 4
    assert "did not answer within 1 s" in e.value.message


def test_foreign_process_and_short_memory_are_refused(tmp_path):
    apps = "GPU-aaaa1111-0000-0000-0000-000000000000, 4242, 30000, python3\n"
    env = fake_smi(tmp_path, apps=apps)
    with pytest.raises(InfraError) as e:
        probe({**env, "CUDA_VISIBLE_DEVICES": "0"})
    assert "pid 4242" in e.value.message
    assert probe({**env, "CUDA_VISIBLE_DEVICES": "1"}).count == 1  # the other GPU is clean
    assert probe({**env, "CUDA_VISIBLE_DEVICES": "0", "FTW_ALLOW_SHARED_GPU": "1"}).count == 1

    small = "0, GPU-cccc, NVIDIA A10G, 23028, 20000, 3028, 550.1\n"
    with pytest.raises(InfraError) as e:
        probe(fake_smi(tmp_path, gpus=small), need_bytes=16 << 30)
    assert "16.0 GiB" in e.value.message and "3.0 GiB free" in e.value.message


def test_no_gpu_needs_an_explicit_cpu_permission(tmp_path):
    env = {"PATH": str(tmp_path)}  # no nvidia-smi on PATH
    with pytest.raises(InfraError) as e:
        probe(env)
    assert "FTW_ALLOW_CPU=1" in e.value.hint
    result = probe(env, allow_cpu=True)
    assert result.cpu_only and stage_env(result, {})["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(InfraError, match="hides every device"):
        probe({**fake_smi(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(InfraError) as e:
        probe({"PATH": str(tmp_path / "no-nvidia-smi"), "FTW_ALLOW_CPU": "0"})
    assert "allows no CPU runs" in e.value.hint


@pytest.mark.parametrize(
    "operator, job_asks, allowed",
    [
        ("1", False, True),
        ("1", True, True),
        ("", True, True),
        ("", False, False),
        ("0", True, False),
        ("false", True, False),
        ("0", False, False),
    ],
)
def test_cpu_runs_are_the_operators_call(operator, job_asks, allowed):
    env = {"FTW_ALLOW_CPU": operator} if operator else {}
    assert cpu_allowed(env, job_asks) is allowed

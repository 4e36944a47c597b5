"""The GPU's clock and slowdowns while a run trains (worker/train/gpu_clocks.py), sampled from nvidia-smi.

No NVIDIA driver here: a stand-in `nvidia-smi` on PATH speaks the real one's protocol for the query the sampler
sends (`--query-gpu=… --format=csv,noheader,nounits --loop-ms=N --id=GPU`: a CSV line per interval until
it is stopped), replaying the lines a test gives it, and records how it was called. The sampler, its process,
its thread and the parsing are the real ones."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from worker.train.gpu_clocks import QUERY, GpuClocks, gpu_id, gpu_warnings, idle_warning, slowdown_warning

FAKE_SMI = """#!{python}
import itertools, json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_SMI_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
loop = next(int(a.split("=", 1)[1]) for a in args if a.startswith("--loop-ms="))
lines = open(os.environ["FAKE_SMI_LINES"]).read().splitlines()
for line in itertools.chain(lines, itertools.repeat(lines[-1])):
    print(line, flush=True)
    time.sleep(loop / 1000)
"""
POWER_CAPPED = "1545, 1980, 692.99, 700.00, 55, 0x0000000000000004, 100"  # at full load: the normal case
THERMAL = "1110, 1980, 520.10, 700.00, 88, 0x0000000000000044, 99"  # power cap and hardware thermal slowdown
HOST_PACED = "1980, 1980, 467.00, 700.00, 50, 0x0000000000000000, 79"  # short steps: the GPU waits on the host


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """Installs the stand-in; returns (write the lines it replays, read the argv it was called with)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(python=sys.executable))
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SMI_LINES", str(tmp_path / "lines.txt"))
    monkeypatch.setenv("FAKE_SMI_CALLS", str(tmp_path / "calls.jsonl"))

    def replay(*lines: str) -> None:
        (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]

    return replay, calls, str(smi)


def sample(clocks: GpuClocks, count: int) -> None:
    clocks.start()
    deadline = time.monotonic() + 20
    while len(clocks.samples) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    clocks.stop()


def test_a_power_capped_run_reports_its_clock_and_no_slowdown(fake_smi):
    replay, calls, _ = fake_smi
    replay(
        POWER_CAPPED,
        "[N/A], 1980, 12.0, 700.00, 40, 0x0, 0",
        "1560, 1980, 690.50, 700.00, 56, 0x0000000000000004, [N/A]",  # a utilization the driver does not report
    )
    clocks = GpuClocks("GPU-1234", period_ms=10)
    sample(clocks, 4)
    assert calls() == [[f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "--loop-ms=10", "--id=GPU-1234"]]
    assert all(s[0] in (1545.0, 1560.0) for s in clocks.samples)  # the [N/A] line is skipped, not a zero
    summary = clocks.summary()
    assert summary["gpu_max_sm_clock_mhz"] == 1980 and summary["gpu_power_limit_w"] == 700
    assert 1545 <= summary["gpu_sm_clock_mhz"] <= 1560
    assert summary["gpu_slowdown_share"] == 0 and summary["gpu_slowdown_reasons"] == ""
    assert slowdown_warning(summary) is None and summary["gpu_busy_share"] == 1.0 and gpu_warnings(summary, False) == []
    newest = clocks.samples[-1]  # a step event's figures: the busy share only where the driver gave it
    busy = {} if newest[6] is None else {"gpu_busy_pct": newest[6]}
    assert clocks.latest() == {"gpu_sm_mhz": newest[0], "gpu_power_w": newest[2], **busy}


def test_a_thermally_throttled_host_is_named_in_a_warning(fake_smi):
    replay, _, _ = fake_smi
    replay(POWER_CAPPED, THERMAL, THERMAL, THERMAL)
    clocks = GpuClocks("0", period_ms=10)
    sample(clocks, 8)
    summary = clocks.summary()
    assert summary["gpu_slowdown_share"] >= 0.6  # every sample after the first is a thermal one
    assert summary["gpu_slowdown_reasons"] == "hardware thermal slowdown"
    assert summary["gpu_max_temperature_c"] == 88
    warning = slowdown_warning(summary)
    assert warning is not None and "hardware thermal slowdown" in warning and "another worker" in warning


def test_a_gpu_left_idle_by_its_host_is_warned_about_with_what_to_change(fake_smi):
    replay, _, _ = fake_smi
    replay(POWER_CAPPED, HOST_PACED)  # one sample at full load, then host-paced ones: the median is theirs
    clocks = GpuClocks("0", period_ms=10)
    sample(clocks, 4)
    summary = clocks.summary()
    assert summary["gpu_busy_share"] == 0.79 and summary["gpu_slowdown_share"] == 0
    warning = idle_warning(summary, sample_packing=False)
    assert warning is not None and "79%" in warning and "micro_batch_size" in warning
    assert gpu_warnings(summary, sample_packing=False) == [warning]
    assert idle_warning({"gpu_busy_share": 0.97}, False) is None and idle_warning({}, False) is None
    # a packed run already has sample_packing: its rows' count or length is what to change
    packed = idle_warning(summary, sample_packing=True)
    assert packed is not None and "sequence_len" in packed and "sample_packing" not in packed


def test_the_sampler_stops_its_process_and_keeps_what_it_read(fake_smi):
    from tests.processes import left_behind

    replay, _, smi = fake_smi
    replay(POWER_CAPPED)
    clocks = GpuClocks("0", period_ms=10)
    sample(clocks, 2)
    clocks.stop()  # a second stop is harmless
    assert clocks.samples and not (clocks.reader and clocks.reader.is_alive())
    assert left_behind(lambda _name, command: smi in command) == []


def test_without_nvidia_smi_nothing_is_sampled_and_nothing_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    clocks = GpuClocks("0", period_ms=10)
    clocks.start()
    clocks.stop()
    assert clocks.latest() == {} and clocks.summary() == {} and slowdown_warning({}) is None


def test_a_gpu_is_named_as_cuda_visible_devices_names_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa, GPU-bbbb")
    assert gpu_id(1) == "GPU-bbbb"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_id(0) == "0"


def test_progress_events_carry_the_clock_and_the_summary_its_figures(fake_smi, tmp_path, monkeypatch):
    import torch

    from tests.train.test_units import cfg
    from worker.train.reporting import Progress

    replay, _, _ = fake_smi
    replay(POWER_CAPPED)
    monkeypatch.setenv("FTW_EVENTS", str(tmp_path / "events.jsonl"))
    cuda = torch.device("cuda", 0)  # only its name: nothing runs on it
    progress = Progress(cfg(logging_steps=1), tmp_path, total_steps=2, first_step=0, enabled=True, device=cuda)
    deadline = time.monotonic() + 20
    while not progress.clocks.samples and time.monotonic() < deadline:
        time.sleep(0.02)
    for step in (1, 2):
        progress.step(step, 1000 * step, {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5})
    progress.close()
    events = [json.loads(line) for line in Path(tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["gpu_sm_mhz"], e["gpu_power_w"], e["gpu_busy_pct"]) for e in events] == [(1545.0, 692.99, 100.0)] * 2
    assert progress.gpu_summary["gpu_sm_clock_mhz"] == 1545 and progress.gpu_summary["gpu_slowdown_share"] == 0


def test_a_train_process_killed_outright_takes_its_sampler_with_it(fake_smi, tmp_path):
    import signal
    import subprocess

    from tests.processes import left_behind

    replay, calls, smi = fake_smi
    replay(POWER_CAPPED)
    code = "from worker.train.gpu_clocks import GpuClocks; import time; GpuClocks('0', 10).start(); time.sleep(60)"
    trainer = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.getcwd()))
    deadline = time.monotonic() + 20
    while not (tmp_path / "calls.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls(), "the sampler never started"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while left_behind(lambda _name, command: smi in command) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left_behind(lambda _name, command: smi in command) == []

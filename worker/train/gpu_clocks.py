"""The GPU's clock, power and slowdowns while a run trains, sampled by `nvidia-smi` (installed with every NVIDIA
driver) once a second in its own process.

Why: a training step of a large model holds a GPU at its power cap, its SM clock well under boost; that is
normal, and the same for every tool. A host whose GPU slows for heat or a power brake is not: the same job
trains slower there and the user pays for the difference. The run's summary gets the medians and the share of
samples under such a slowdown (`gpu_slowdown_share`), and the job result warns above a tenth of the run
(`slowdown_warning`, read by the orchestrator without torch). Also sampled: how busy the GPU was (the share of each
interval some kernel ran). A run whose GPU idled for a large part of its steps paid for it while the host worked:
micro-batches of few tokens take less GPU time than the host needs to launch them (docs/benchmarks.md, "eleventh
session"), and the result says what to change (`idle_warning`). Rank 0 samples its own GPU; where nvidia-smi is
missing or fails, the run trains as before and reports nothing of it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
from typing import IO, Any

from worker.estimate.model import more_tokens_advice

QUERY = "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active,utilization.gpu"
SLOWDOWNS = {  # NVML's clock event reasons that mean the host, not the workload, held the clock down
    0x8: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
}
WARN_SHARE = 0.1
BUSY_WARN = 0.85  # a training step on the GPU keeps it ~99% busy; under this median, the host set the pace


def gpu_id(device_index: int) -> str:
    """nvidia-smi's id of torch's cuda:`device_index`: its entry in CUDA_VISIBLE_DEVICES (an index or a UUID)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[device_index] if device_index < len(visible) else str(device_index)


class GpuClocks:
    """Samples from `start()` to `stop()`; `latest()`: the newest sample's clock and power, for progress events;
    `summary()`: the run's figures."""

    def __init__(self, gpu: str | None, period_ms: int = 1000):
        self.gpu, self.period_ms = gpu, period_ms
        self.samples: list[tuple] = []  # clock, max clock, power, limit, temperature, reasons, busy % (or None)
        self.proc: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        binary = shutil.which("nvidia-smi")
        if self.gpu is None or binary is None:
            return
        argv = [binary, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"--loop-ms={self.period_ms}"]
        try:
            # a train child killed outright closes the pipe: the sampler's next line ends it (SIGPIPE)
            self.proc = subprocess.Popen(
                [*argv, f"--id={self.gpu}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:
            return
        self.reader = threading.Thread(target=self._read, args=(self.proc.stdout,), name="gpu-clocks", daemon=True)
        self.reader.start()

    def _read(self, lines: IO[str]) -> None:
        for line in lines:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 7:
                continue  # not a sample: a message of nvidia-smi's
            try:
                self.samples.append((*map(float, fields[:5]), int(fields[5], 16), _number(fields[6])))
            except ValueError:
                continue  # a field the driver reports as [N/A] or [Not Supported]

    def stop(self) -> None:
        """Ends the sampler (idempotent); what it sampled stays. It holds no state worth a graceful stop."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()
        if self.reader is not None:
            self.reader.join(timeout=5)

    def latest(self) -> dict[str, float]:
        """The newest sample's clock, power and busy percentage (where the driver reports it): a step event's
        figures, so a window of steps can be judged on its own (the summary spans the whole run, warmup included)."""
        if not self.samples:
            return {}
        clock, _, power, *_, busy = self.samples[-1]
        return {"gpu_sm_mhz": clock, "gpu_power_w": power, **({} if busy is None else {"gpu_busy_pct": busy})}

    def summary(self) -> dict[str, Any]:
        """Medians of the SM clock and power, the hottest reading, and the share of samples under a slowdown
        of the host's (with the reasons seen); empty without samples."""
        if not self.samples:
            return {}
        clock, max_clock, power, limit, temperature, reasons, busy = zip(*self.samples)
        slowed = [r for r in reasons if any(r & bit for bit in SLOWDOWNS)]
        seen = sorted({name for r in slowed for bit, name in SLOWDOWNS.items() if r & bit})
        busy_known = [b for b in busy if b is not None]
        return {
            **({"gpu_busy_share": round(statistics.median(busy_known) / 100, 3)} if busy_known else {}),
            "gpu_sm_clock_mhz": statistics.median(clock),
            "gpu_max_sm_clock_mhz": max(max_clock),
            "gpu_power_w": round(statistics.median(power), 1),
            "gpu_power_limit_w": max(limit),
            "gpu_max_temperature_c": max(temperature),
            "gpu_slowdown_share": round(len(slowed) / len(reasons), 3),
            "gpu_slowdown_reasons": ", ".join(seen),
        }


def _number(field: str) -> float | None:
    """A utilization the driver may not report ([N/A]): the sample's other figures still count."""
    try:
        return float(field)
    except ValueError:
        return None


def gpu_warnings(metrics: dict[str, Any], sample_packing: bool) -> list[str]:
    """The job result's warnings about the GPU the run trained on (`sample_packing`: the run's config's)."""
    return [w for w in (slowdown_warning(metrics), idle_warning(metrics, sample_packing)) if w is not None]


def idle_warning(metrics: dict[str, Any], sample_packing: bool) -> str | None:
    """When the GPU idled for much of the run: its steps waited on the host."""
    busy = metrics.get("gpu_busy_share")
    if not isinstance(busy, (int, float)) or busy >= BUSY_WARN:
        return None
    return (
        f"the GPU was busy a median {busy:.0%} of the time while training: its steps waited on the host, which takes "
        "about as long to launch a micro-batch of few tokens as the GPU takes to run it; more tokens a micro-batch "
        f"({more_tokens_advice(sample_packing)}) would use the GPU you pay for (`ftw estimate` shows the effect)"
    )


def slowdown_warning(metrics: dict[str, Any]) -> str | None:
    """The job result's warning when the GPU spent more than a tenth of the run slowed by its host."""
    share = metrics.get("gpu_slowdown_share")
    if not isinstance(share, (int, float)) or share <= WARN_SHARE:
        return None
    return (
        f"the GPU ran {share:.0%} of training under {metrics.get('gpu_slowdown_reasons') or 'a slowdown'} "
        f"(SM clock median {metrics.get('gpu_sm_clock_mhz')} of {metrics.get('gpu_max_sm_clock_mhz')} MHz, "
        f"up to {metrics.get('gpu_max_temperature_c')} °C): the host, not the job, held it back; the same job "
        "trains faster on another worker (exclude this one, or report it to the provider)"
    )

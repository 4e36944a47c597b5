"""What one training step does besides its kernels' work, for the bench scripts: where it makes the host wait
for the GPU, and where its GPU time goes."""

from __future__ import annotations

from pathlib import Path


def sync_sites(step, batch) -> dict[str, int]:
    """Where one more step makes the host wait for the GPU (torch's sync debug mode): the innermost
    frames outside torch → count. A step without any lets the host run ahead; each one drains the queue."""
    import traceback
    import warnings

    import torch

    torch.cuda.synchronize()
    sites: dict[str, int] = {}

    def record(message, *_args, **_kwargs):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        site = " < ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(frames[-3:]))
        sites[site] = sites.get(site, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def profile_steps(step, batches, path: str) -> float:
    """Where the time goes: three steps under the torch profiler, kernels by total GPU time, and their timeline
    (PATH.trace.json.gz, chrome://tracing); then the host's side of the same steps (`host_profile`,
    PATH.host.txt). Returns the GPU's busy milliseconds a step (its kernels' time summed): against the
    unprofiled step time, what the GPU idles."""
    import gzip
    import os
    import shutil

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # the ops' shapes too: bench/step_split.py tells LoRA's rank-sized GEMMs from the model's by them
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for b, _ in batches:
            step(b)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / len(batches)
    prof.export_chrome_trace(f"{path}.trace.json")
    with open(f"{path}.trace.json", "rb") as raw, gzip.open(f"{path}.trace.json.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    os.remove(f"{path}.trace.json")
    table = averages.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
    Path(path).write_text(f"GPU busy {busy_ms:.1f} ms a step (kernels' time summed)\n{table}")
    host_profile(step, batches, f"{path}.host.txt")
    return busy_ms


def host_profile(step, batches, path: str) -> None:
    """Where the host's time goes when it, not the GPU, sets the pace (short steps: few tokens, many launches):
    the same steps under cProfile, Python functions by their own time and by their total, to PATH."""
    import cProfile
    import io
    import pstats
    import time

    import torch

    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for b, _ in batches:
        step(b)
    profiler.disable()
    host_ms = (time.perf_counter() - t0) * 1e3 / len(batches)
    torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    Path(path).write_text(f"host {host_ms:.1f} ms a step under cProfile (its own overhead included)\n{out.getvalue()}")

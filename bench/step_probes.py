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


def profile_steps(step, batches, path: str) -> None:
    """Where the time goes: three steps under the torch profiler, kernels by total GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b, _ in batches:
            step(b)
        torch.cuda.synchronize()
    Path(path).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70))

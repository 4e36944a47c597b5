"""An optional torch.profiler window over training steps, for finding where a step's time goes.

    FTW_PROFILE_STEPS=8:12 ftw train CONFIG     # profile steps 8..11, write RUN_DIR/profile.txt

The table lists ops by self CPU time and by GPU time, plus the steps' wall times, so a loop that
is bound by host work (launches, syncs, collation) is told apart from one bound by kernels; then the
window's Python functions under cProfile, by their own time and by their total, which name the code
that spends a host-bound step's time (both profilers' overheads inflate the walls).
"""

from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import time
from pathlib import Path

import torch

log = logging.getLogger("ftw.train")


class StepProfiler:
    def __init__(self, run_dir: Path, steps: range, spec: str | None = None):
        """`steps`: the optimizer steps this run takes (from a resumed step on); a window outside them, or a spec
        that does not parse, profiles nothing and says so, and one that runs past their end closes with them."""
        spec = os.environ.get("FTW_PROFILE_STEPS", "") if spec is None else spec
        self.path = run_dir / "profile.txt"
        self.window = window(spec, steps) if spec else None
        self.prof = None
        self.python: cProfile.Profile | None = None
        self.walls: list[float] = []
        self.t = 0.0

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0]:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.python = cProfile.Profile()
            self.python.enable()
        if self.prof is not None:
            self.t = time.perf_counter()

    def after_step(self, step: int) -> None:
        """`step` is the number of steps done; the window closes after step window[1] - 1."""
        if self.prof is None:
            return
        self.walls.append(time.perf_counter() - self.t)
        if step >= self.window[1]:
            self.close()

    def close(self) -> None:
        """Writes the window's tables if it is open: at its end, or where the run stops inside it (early
        stopping, preemption, an error)."""
        if self.prof is None:
            return
        prof, python, self.prof, self.python = self.prof, self.python, None, None
        try:
            python.disable()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            averages = prof.key_averages()
            gpu_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.path.write_text(
                f"step wall s: {[round(w, 4) for w in self.walls]}\n\n== by self CPU time ==\n"
                + averages.table(sort_by="self_cpu_time_total", row_limit=25)
                + "\n\n== by GPU time ==\n"
                + averages.table(sort_by=gpu_key, row_limit=25)
                + python_functions(python)
            )
        except Exception as e:  # a run stopping on a CUDA error: its own error is the one to report
            log.warning("the profile of steps from %d could not be written: %s", self.window[0] + 1, e)
            return
        log.info("profiled steps %d..%d: %s", self.window[0] + 1, self.window[0] + len(self.walls), self.path)


def window(spec: str, steps: range) -> tuple[int, int] | None:
    """FTW_PROFILE_STEPS's START[:END] (END defaults to START + 3) within `steps`, or None with a warning why not."""
    start, _, end = spec.partition(":")
    try:
        first, stop = int(start), int(end or int(start) + 3)
    except ValueError:
        log.warning("FTW_PROFILE_STEPS=%r is not START[:END] (e.g. 8:12): no steps profiled", spec)
        return None
    if not (steps.start <= first < min(stop, steps.stop)):
        log.warning(
            "FTW_PROFILE_STEPS=%r names no step of this run (steps %d..%d are due): no steps profiled",
            spec, steps.start, steps.stop - 1,
        )  # fmt: skip
        return None
    return first, min(stop, steps.stop)


def python_functions(profile: cProfile.Profile, rows: int = 30) -> str:
    """The profiled window's Python functions, top `rows` by own time and by total time."""
    out = io.StringIO()
    for key, title in (("tottime", "own"), ("cumulative", "total")):
        out.write(f"\n\n== Python functions by {title} time ==\n")
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(rows)
    return out.getvalue()

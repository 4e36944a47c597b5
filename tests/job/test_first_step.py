"""Time to first step: every job's timings say when its first optimizer step was done, and a warm
worker's next job forks its stages from the template the first job started (no imports again)."""

from __future__ import annotations

import re

from tests.job.conftest import example_job
from worker.job.pipeline import run_job

CONFIG = {"max_steps": 3, "save_steps": None, "logging_steps": 2, "sequence_len": 64, "micro_batch_size": 2}
FORKED = re.compile(r"stage forked from the template \(pid (\d+)\)")


def template_pids(run_dir) -> set[str]:
    """The template each stage child of the run was forked from, by its own first log line."""
    pids = set()
    for stage in ("preprocess", "train"):
        found = FORKED.search((run_dir / "logs" / stage / "attempt-1" / "stderr.log").read_text())
        assert found, f"the {stage} child of {run_dir.name} was not forked from the template"
        pids.add(found.group(1))
    return pids


def test_timings_report_the_first_step_and_a_second_job_reuses_the_warm_template(demo_volume):
    results = [run_job({"input": example_job(run_id=run_id, config=CONFIG)}) for run_id in ("first", "second")]
    for result in results:
        assert result["status"] == "completed", result
        t = result["timings"]
        assert t["validate_s"] <= t["first_step_s"] <= t["total_s"], t
        # the first step comes after preprocessing and before training ends
        assert t["preprocess_s"] < t["first_step_s"] < t["total_s"] - t["publish_s"], t
    first, second = (template_pids(demo_volume / "runs" / run_id) for run_id in ("first", "second"))
    assert first == second and len(first) == 1  # one template, kept between the jobs

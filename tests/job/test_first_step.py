"""Time to first step: every job's timings say when its first optimizer step was done, and a warm
worker's next job forks its stages from the template the first job started (no imports again)."""

from __future__ import annotations

import os
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
        # where it went: the train child's start-up, the model's set-up, the first step; before them
        # the stages up to training (validate, checks, preprocess) took the rest
        parts = [t["train_startup_s"], t["model_setup_s"], t["first_step_compute_s"]]
        assert all(p > 0 for p in parts), t
        assert t["preprocess_s"] + sum(parts) <= t["first_step_s"] + 0.01 <= t["train_s"] + t["preprocess_s"] + 5, t
    first, second = (template_pids(demo_volume / "runs" / run_id) for run_id in ("first", "second"))
    assert first == second and len(first) == 1  # one template, kept between the jobs


def test_the_parts_come_from_the_train_childs_own_events_once():
    from worker.job.first_step import FirstStepClock

    clock = FirstStepClock(job_started_wall=100.0)
    clock.marks["train"] = 110.0  # what train_started() records
    assert clock.observe("preprocess", {"event": "loading", "ts": 105.0}) == {}  # another stage's milestone
    assert clock.observe("train", {"event": "loading", "ts": 112.5}) == {"train_startup_s": 2.5}
    assert clock.observe("train", {"event": "ready", "ts": 120.0}) == {"model_setup_s": 7.5}
    assert clock.observe("train", {"step": 1, "loss": 2.0, "ts": 121.0}) == {}
    assert clock.observe("train", {"event": "first_step", "ts": 123.25}) == {
        "first_step_s": 23.25,
        "first_step_compute_s": 3.25,
    }
    # a retried train stage (resumed after preemption) does not move the job's first step
    clock.train_started()
    assert clock.observe("train", {"event": "loading", "ts": 200.0}) == {}
    assert clock.observe("train", {"event": "first_step", "ts": 210.0}) == {}
    # without the earlier mark (another rank's child, an older child) the part is left out, not guessed
    other = FirstStepClock(job_started_wall=0.0)
    assert other.observe("train", {"event": "ready", "ts": 5.0}) == {}
    first = other.observe("train", {"event": "first_step", "ts": 6.0})
    assert first == {"first_step_s": 6.0, "first_step_compute_s": 1.0}


def test_compiled_kernels_are_kept_on_the_volume_for_the_next_worker(demo_volume):
    """torch_compile's kernels land under BASE_VOLUME/cache/compile, where a fresh worker of the same
    endpoint finds them (bench/first_step.py: its first step then skips the compilation)."""
    config = {**CONFIG, "max_steps": 1, "torch_compile": True}
    # the worker's environment as handler.py has it: this test process imported torch, whose Inductor
    # may have written its default cache folder into os.environ
    endpoint = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    result = run_job({"input": example_job(run_id="compiled", config=config)}, env=endpoint)
    assert result["status"] == "completed", result
    inductor = demo_volume / "cache" / "compile" / "inductor"
    assert inductor.is_dir() and any(inductor.rglob("*.py")), "Inductor compiled nothing onto the volume"


def test_the_endpoints_own_compile_cache_setting_wins(tmp_path):
    from worker.job.children import compile_cache_env

    assert compile_cache_env({}, tmp_path) == {
        "TRITON_CACHE_DIR": str(tmp_path / "cache" / "compile" / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "compile" / "inductor"),
    }
    assert compile_cache_env({"TRITON_CACHE_DIR": "/fast/triton"}, tmp_path) == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "compile" / "inductor")
    }

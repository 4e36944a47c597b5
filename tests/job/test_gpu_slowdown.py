"""A job whose GPU its host slowed (heat, a power brake) says so in its result: the orchestrator reads the train
stage's figures (worker/train/gpu_clocks.py samples them; tests/train/test_gpu_clocks.py) and warns."""

from __future__ import annotations

from tests.job.conftest import example_job
from worker.data.prepared import PreparedCache
from worker.job.pipeline import JobPipeline, run_job


def test_a_job_whose_gpu_was_slowed_by_its_host_says_so_in_its_result(demo_volume, monkeypatch, tmp_path):
    """The orchestrator reads the train stage's figures and warns in the job result; the stages around training
    are stood in for (a slowed GPU cannot be had here), the checks and the result are the real ones."""
    slowed = {"steps": 1, "gpu_slowdown_share": 0.5, "gpu_slowdown_reasons": "hardware power brake"}
    monkeypatch.setattr(JobPipeline, "preprocess", lambda *_: PreparedCache(tmp_path, {}))
    monkeypatch.setattr(JobPipeline, "train", lambda *_: {**slowed, "gpu_sm_clock_mhz": 990.0})
    monkeypatch.setattr(JobPipeline, "publish", lambda *_: [])
    result = run_job({"input": example_job(run_id="slowed-gpu")})
    assert result["status"] == "completed", result
    gpu = [w for w in result["warnings"] if w["loc"] == "gpu"]
    assert len(gpu) == 1 and "50% of training under hardware power brake" in gpu[0]["msg"], result["warnings"]
    monkeypatch.setattr(JobPipeline, "train", lambda *_: {"steps": 1, "gpu_slowdown_share": 0.0})
    assert not [w for w in run_job({"input": example_job(run_id="healthy-gpu")})["warnings"] if w["loc"] == "gpu"]
    # a GPU its steps left idle: the result says what to change in the config, as the config stands
    monkeypatch.setattr(JobPipeline, "train", lambda *_: {"steps": 1, "gpu_slowdown_share": 0.0, "gpu_busy_share": 0.7})
    unpacked = example_job(run_id="idle-gpu", config={"sample_packing": False})
    idle = [w for w in run_job({"input": unpacked})["warnings"] if w["loc"] == "gpu"]
    assert len(idle) == 1 and "busy a median 70%" in idle[0]["msg"] and "sample_packing: true" in idle[0]["msg"]
    packed = [w for w in run_job({"input": example_job(run_id="idle-packed")})["warnings"] if w["loc"] == "gpu"]
    assert len(packed) == 1 and "sequence_len" in packed[0]["msg"] and "sample_packing" not in packed[0]["msg"]

"""A job this machine cannot train is refused after the GPU probe, before preprocessing spends anything."""
from __future__ import annotations

import importlib.util

import pytest

from tests.job.conftest import example_job
from worker.errors import JobSpecError
from worker.job.pipeline import run_job


@pytest.mark.parametrize("config, says", [
    ({"adapter": "qlora", "load_in_4bit": True}, "needs a CUDA GPU"),
    ({"attn_implementation": "flash_attention_2"}, "flash-attn"),
    ({"use_mlflow": True}, "mlflow logging is configured, but not installed"),
    ({"optimizer": "adamw_bnb_8bit"}, "needs bitsandbytes on a CUDA GPU"),
    ({"optimizer": "adamw_torch_4bit"}, "not available in this build"),
], ids=["qlora-on-cpu", "flash-attn", "tracker", "8bit-optimizer-on-cpu", "unbuilt-optimizer"])
def test_unmet_machine_requirements_fail_at_the_checks_before_any_stage(demo_volume, config, says):
    if "use_mlflow" in config and importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    if "attn_implementation" in config and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    result = run_job({"input": example_job(run_id="cannot-train", config=config)})
    error = result["error"]
    assert result["status"] == "failed" and error["code"] == JobSpecError.code and error["stage"] == "checks", result
    assert says in error["message"] and error["hint"]
    run = demo_volume / "runs" / "cannot-train"
    assert not (run / "logs" / "preprocess").exists() and not (demo_volume / "cache").exists()


def test_a_bug_in_a_stage_still_leaves_the_failure_in_result_json(demo_volume, monkeypatch):
    """An exception that is not an FtwError (a bug) is reported in the one failure shape, on disk too."""
    import json

    from worker.job import pipeline

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(pipeline, "estimate_disk", broken)
    result = run_job({"input": example_job(run_id="buggy")})
    assert result["status"] == "failed" and result["error"]["stage"] == "orchestrator" and "KeyError" in result["error"]["message"]
    on_disk = json.loads((demo_volume / "runs" / "buggy" / "result.json").read_text())
    assert on_disk["error"] == result["error"]

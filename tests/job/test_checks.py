"""A job this machine cannot train is refused after the GPU probe, before preprocessing spends anything."""

from __future__ import annotations

import importlib.util

import pytest

from tests.job.conftest import example_job
from worker.errors import JobSpecError
from worker.job.pipeline import run_job


@pytest.mark.parametrize(
    "config, says",
    [
        ({"adapter": "qlora", "load_in_4bit": True}, "needs a CUDA GPU"),
        ({"attn_implementation": "flash_attention_2"}, "flash-attn"),
        ({"use_mlflow": True}, "mlflow logging is configured, but not installed"),
        ({"optimizer": "adamw_bnb_8bit"}, "needs bitsandbytes on a CUDA GPU"),
    ],
    ids=["qlora-on-cpu", "flash-attn", "tracker", "8bit-optimizer-on-cpu"],
)
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


def test_an_optimizer_ftw_does_not_build_is_refused_at_validation_naming_those_it_does(demo_volume):
    """An optimizer ftw knows but does not build used to pass validation and be refused only at the checks."""
    for name in ("galore_adamw", "schedule_free_adamw"):
        result = run_job({"input": example_job(run_id=f"not-built-{name}", config={"optimizer": name})})
        error = result["error"]
        assert error["code"] == JobSpecError.code and error["stage"] == "validate", error
        assert f"optimizer '{name}' is not supported by ftw; use one of adamw_torch, " in error["message"]
        assert "adamw_bnb_8bit" in error["message"] and "adamw_torch_8bit" in error["message"]
        assert not (demo_volume / "runs" / f"not-built-{name}").exists()


def test_local_inputs_that_are_not_there_are_named_before_any_stage(demo_volume, monkeypatch):
    """A wrong local path used to surface as a library's message from inside preprocessing (a 'repo id'
    error for a missing model folder, a sentencepiece hint for a folder without tokenizer files)."""
    no_tokenizer = demo_volume / "models" / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in (demo_volume / "models" / "ftw-tiny-chatml").iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    cases = {
        "missing-model": ({"base_model": "./models/nope"}, "base_model: ./models/nope does not exist"),
        "missing-data": (
            {"datasets": [{"path": "./data/nope.jsonl", "type": "alpaca"}]},
            "datasets[0].path: ./data/nope.jsonl does not exist",
        ),
        "no-tokenizer": (
            {"base_model": "./models/no-tokenizer"},
            "base_model: ./models/no-tokenizer has no tokenizer files",
        ),
    }
    for run_id, (config, says) in cases.items():
        error = run_job({"input": example_job(run_id=run_id, config=config)})["error"]
        assert error["code"] == JobSpecError.code and error["stage"] == "checks" and says in error["message"], error
        assert "BASE_VOLUME" in error["hint"] or "tokenizer_config" in error["hint"]
    assert not (demo_volume / "cache").exists()
    tokenizer_elsewhere = example_job(
        run_id="tokenizer-elsewhere",
        config={"base_model": "./models/no-tokenizer", "tokenizer_config": "./models/ftw-tiny-chatml", "max_steps": 1},
    )
    from worker.errors import DataError
    from worker.job.pipeline import JobPipeline

    def stop_after_the_checks(*_):
        raise DataError("stopped by the test after the checks")

    monkeypatch.setattr(JobPipeline, "preprocess", stop_after_the_checks)
    result = run_job({"input": tokenizer_elsewhere})  # the tokenizer named by tokenizer_config is enough
    assert (
        result["error"]["message"] == "stopped by the test after the checks"
        and (demo_volume / "runs" / "tokenizer-elsewhere" / "checks.json").is_file()
    ), result


def test_a_bug_in_a_stage_still_leaves_the_failure_in_result_json(demo_volume, monkeypatch):
    """An exception that is not an FtwError (a bug) is reported in the one failure shape, on disk too."""
    import json

    from worker.checks import stage

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(stage, "estimate_disk", broken)
    result = run_job({"input": example_job(run_id="buggy")})
    assert (
        result["status"] == "failed"
        and result["error"]["stage"] == "orchestrator"
        and "KeyError" in result["error"]["message"]
    )
    on_disk = json.loads((demo_volume / "runs" / "buggy" / "result.json").read_text())
    assert on_disk["error"] == result["error"]

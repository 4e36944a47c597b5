"""The stage children's typed outputs are files of the run folder, read back into dataclasses: the
orchestrator never parses a child's stdout (which stays for people)."""

from __future__ import annotations

import json

import pytest

from worker.data.prepared import PreparedCache
from worker.errors import DataError
from worker.job.children import prepared_data, trained_output
from worker.train.summary import TrainSummary


def complete_cache(folder):
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"complete": True}))
    return folder


def test_the_prepared_data_comes_back_from_its_file_and_only_when_the_cache_is_complete(tmp_path):
    cache = complete_cache(tmp_path / "cache")
    output = tmp_path / "prepared.json"
    PreparedCache(cache, {"rows": {"in": 3}, "built": True}).write(output)
    assert prepared_data(output) == PreparedCache(cache, {"rows": {"in": 3}, "built": True})

    (cache / "manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(DataError, match="not complete"):
        prepared_data(output)
    output.write_text('{"cache_dir": "/x"}')  # a stdout-style summary is not the contract
    with pytest.raises(DataError, match="prepared.json is missing or malformed"):
        prepared_data(output)


def test_training_is_finished_only_while_its_summary_and_weights_are_in_the_run_folder(tmp_path):
    summary = {"steps": 4, "final_loss": 1.5, "tokens_per_s": 99.5, "runtime_s": 2.0, "loss_curve": [[1, 2.0]]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert trained_output(tmp_path, full_finetune=False, merge=False) is None  # no adapter/
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    read = trained_output(tmp_path, full_finetune=False, merge=False)
    assert isinstance(read, TrainSummary) and read.steps == 4 and read.final_loss == 1.5
    assert read.metrics == {"steps": 4, "final_loss": 1.5, "tokens_per_s": 99.5, "runtime_s": 2.0}  # scalars only
    assert trained_output(tmp_path, full_finetune=False, merge=True) is None  # merged/ asked, missing
    (tmp_path / "summary.json").unlink()
    assert trained_output(tmp_path, full_finetune=False, merge=False) is None

"""`ftw train CONFIG` refuses a bad config before starting anything (exit 3, every error named)."""

from __future__ import annotations

from worker import cli


def main(argv: list[str]) -> int:
    """`ftw train ARGV`."""
    return cli.main(["train", *argv])


def test_invalid_config_exits_3_before_any_stage_runs(tmp_path, capsys, volume):
    path = tmp_path / "bad.yml"
    path.write_text("base_model: /nowhere\nlearning_rate: 0.001\nadapter: qlora\nlora_r: 0\n")
    assert main([str(path), "--run-dir", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert "lora_r" in err and "datasets" in err and "load_in_4bit" in err
    assert not (tmp_path / "run").exists()


def test_unreadable_config_is_a_usage_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing.yml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_preprocess_failure_is_reported_once(tmp_path, capfd, volume, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FTW_ALLOWED_PATHS", str(tiny_model_dir))
    path = tmp_path / "nodata.yml"
    path.write_text(
        f"base_model: {tiny_model_dir}\ndatasets:\n  - path: ./data/nope.jsonl\n    type: completion\n"
        "learning_rate: 0.001\n"
    )
    assert main([str(path)]) == 1
    err = capfd.readouterr().err
    assert err.count("nope.jsonl") == 1 and err.count("hint:") == 1, err
    assert not (volume / "runs" / "nodata" / "adapter").exists()


def test_what_this_machine_lacks_is_refused_before_preprocessing(tmp_path, capsys, volume, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FTW_ALLOWED_PATHS", str(tiny_model_dir))
    path = tmp_path / "qlora.yml"
    path.write_text(
        f"base_model: {tiny_model_dir}\ndatasets:\n  - path: ./data/any.jsonl\n    type: completion\n"
        "learning_rate: 0.001\nadapter: qlora\nload_in_4bit: true\n"
    )
    assert main([str(path), "--run-dir", str(tmp_path / "run")]) == 3
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (volume / "cache").exists()

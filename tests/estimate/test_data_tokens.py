"""The data-size estimate from local files: the same rows as JSON Lines or a JSON array read the
same; a file larger than the sample is scaled by its size; lines that are not JSON are skipped."""

from __future__ import annotations

import json

from worker.estimate import data_tokens
from worker.estimate.data_tokens import estimate_file

ROW = {
    "messages": [
        {"role": "user", "content": "How far is the moon? " * 5},
        {"role": "assistant", "content": "About 384,400 km. " * 8},
    ]
}


def test_jsonl_and_a_json_array_of_the_same_rows_read_the_same(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(ROW) + "\n" for _ in range(500)))
    (tmp_path / "b.json").write_text(json.dumps([ROW] * 500))
    tokens, rows = estimate_file(tmp_path / "a.jsonl")
    chars = len(ROW["messages"][0]["content"]) + len(ROW["messages"][1]["content"]) + len("user") + len("assistant")
    assert rows == 500 and tokens == int(500 * (chars / data_tokens.CHARS_PER_TOKEN + 2 * data_tokens.TEMPLATE_TOKENS))
    other_tokens, other_rows = estimate_file(tmp_path / "b.json")
    assert other_rows == 500 and abs(other_tokens / tokens - 1) < 0.02


def test_a_file_beyond_the_sample_is_scaled_and_bad_lines_are_skipped(tmp_path, monkeypatch):
    line = json.dumps(ROW) + "\n"
    (tmp_path / "big.jsonl").write_text(line * 1000 + "not json\n")
    whole, rows = estimate_file(tmp_path / "big.jsonl")
    assert rows == 1000
    monkeypatch.setattr(data_tokens, "SAMPLE_BYTES", len(line) * 100 + 10)  # reads ~100 rows of 1,000
    sampled, sampled_rows = estimate_file(tmp_path / "big.jsonl")
    assert abs(sampled / whole - 1) < 0.02 and abs(sampled_rows / rows - 1) < 0.02

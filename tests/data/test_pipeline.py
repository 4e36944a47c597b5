"""The pipeline end to end, in process: sources of every local format, merge, dedup, shuffle,
split, length policy, packing, the manifest, and data errors naming file, row and field."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pytest

from tests.data.helpers import alpaca_rows, chat_rows, config, write_jsonl
from worker.data.cache import load_prepared
from worker.data.pipeline import prepare
from worker.data.pipeline import tokenize_batch as original_tokenize_batch
from worker.errors import DataError, JobSpecError


def rows_of(summary) -> list[list[int]]:
    return sorted(list(load_prepared(summary["cache_dir"]).train["input_ids"]))


def test_every_local_format_gives_the_same_rows(volume, tokenizer_dir):
    rows = alpaca_rows(40)
    data = volume / "data"
    write_jsonl(data / "a.jsonl", rows)
    (data / "a.json").write_text(json.dumps(rows))
    table = pa.Table.from_pylist(rows)
    ds = datasets.Dataset(table)
    ds.to_parquet(str(data / "a.parquet"))
    ds.to_csv(str(data / "a.csv"), index=False)
    with pa.ipc.new_stream(str(data / "a.arrow"), table.schema) as w:
        w.write_table(table)
    write_jsonl(data / "folder" / "part1.jsonl", rows[:25])
    write_jsonl(data / "folder" / "part2.jsonl", rows[25:])
    ds.save_to_disk(str(data / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(data / "saved_dict"))
    results = {}
    for name in ("a.jsonl", "a.json", "a.parquet", "a.csv", "a.arrow", "folder", "saved", "saved_dict"):
        summary = prepare(
            config(tokenizer_dir, [{"path": str(data / name), "type": "alpaca"}], shuffle_merged_datasets=False)
        )
        assert summary["rows"]["in"] == 40 and summary["rows"]["train"] == 40, name
        results[name] = rows_of(summary)
    assert all(r == results["a.jsonl"] for r in results.values())


def test_merge_dedup_shuffle_and_eval_split(volume, tokenizer_dir):
    rows = alpaca_rows(60)
    first = write_jsonl(volume / "one.jsonl", rows[:40])
    second = write_jsonl(volume / "two.jsonl", rows[30:60])  # rows 30..39 appear twice
    cfg = config(
        tokenizer_dir,
        [{"path": str(first), "type": "alpaca"}, {"path": str(second), "type": "alpaca"}],
        dataset_exact_deduplication=True,
        val_set_size=0.25,
        seed=7,
    )
    summary = prepare(cfg)
    assert summary["rows"]["in"] == 70
    assert summary["rows"]["dropped"] == {"duplicate": 10}
    assert (summary["rows"]["train"], summary["rows"]["eval"]) == (45, 15)
    prepared = load_prepared(summary["cache_dir"])
    train, evaluation = list(prepared.train["input_ids"]), list(prepared.eval["input_ids"])
    assert not {tuple(r) for r in train} & {tuple(r) for r in evaluation}
    assert len({tuple(r) for r in train + evaluation}) == 60
    again = prepare(cfg.model_copy(update={"dataset_prepared_path": str(volume / "elsewhere")}))
    assert list(load_prepared(again["cache_dir"]).train["input_ids"]) == train  # same seed, same order
    in_order = list(
        load_prepared(
            prepare(cfg.model_copy(update={"shuffle_merged_datasets": False, "val_set_size": 0.0}))["cache_dir"]
        ).train["input_ids"]
    )
    shuffled = list(
        load_prepared(prepare(cfg.model_copy(update={"val_set_size": 0.0}))["cache_dir"]).train["input_ids"]
    )
    assert sorted(in_order) == sorted(shuffled) and in_order != shuffled


def test_length_policy_drop_truncate_raise(volume, tokenizer_dir):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(50, max_words=60))
    entry = [{"path": str(path), "type": "alpaca"}]
    dropped = prepare(config(tokenizer_dir, entry, sequence_len=80))
    n_long = dropped["rows"]["dropped"]["too_long"]
    assert 0 < n_long < 50 and dropped["rows"]["train"] == 50 - n_long
    truncated = prepare(config(tokenizer_dir, entry, sequence_len=80, excess_length_strategy="truncate"))
    assert truncated["rows"]["train"] == 50 and truncated["rows"]["truncated"] == n_long
    assert max(len(r) for r in load_prepared(truncated["cache_dir"]).train["input_ids"]) == 80
    with pytest.raises(
        DataError, match=rf"{path}: row \d+: \d+ tokens, more than sequence_len 80 \({n_long} such rows\)"
    ):
        prepare(config(tokenizer_dir, entry, sequence_len=80, excess_length_strategy="raise"))
    short = prepare(config(tokenizer_dir, entry, sequence_len=400, min_sample_len=60))
    assert short["rows"]["dropped"]["too_short"] > 0


def test_packing_layout_and_manifest(volume, tokenizer_dir):
    path = write_jsonl(volume / "chat.jsonl", chat_rows(300))
    cfg = config(tokenizer_dir, [{"path": str(path), "type": "chat_template"}], sequence_len=256, micro_batch_size=2)
    plain = prepare(cfg)
    packed = prepare(cfg.model_copy(update={"sample_packing": True}))
    assert packed["tokens"] == plain["tokens"]
    unpacked_rows = load_prepared(plain["cache_dir"]).train
    bins = load_prepared(packed["cache_dir"])
    assert bins.packed and not load_prepared(plain["cache_dir"]).packed
    assert bins.train.features["input_ids"].feature.dtype == "int32"
    samples = sorted(map(tuple, unpacked_rows["input_ids"]))
    regrouped = []
    for row in bins.train:
        assert len(row["input_ids"]) <= 512
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        assert row["position_ids"] == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        regrouped += [tuple(row["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]
    assert sorted(regrouped) == samples  # every sample exactly once
    manifest = bins.manifest
    assert manifest["complete"] is True and manifest["packing"]["bins"] == len(bins.train)
    assert manifest["packing"]["fill"] == pytest.approx(packed["tokens"]["train"] / (512 * len(bins.train)), abs=1e-4)
    assert 0 < manifest["tokens"]["trained_share"] < 1


def test_test_datasets_and_pretraining(volume, tokenizer_dir):
    train = write_jsonl(volume / "train.jsonl", alpaca_rows(20))
    evaluation = write_jsonl(volume / "eval.jsonl", alpaca_rows(5, seed=3))
    summary = prepare(
        config(
            tokenizer_dir,
            [{"path": str(train), "type": "alpaca"}],
            test_datasets=[{"path": str(evaluation), "type": "alpaca"}],
        )
    )
    assert (summary["rows"]["train"], summary["rows"]["eval"]) == (20, 5)
    with pytest.raises(JobSpecError, match="exclusive"):
        prepare(
            config(
                tokenizer_dir,
                [{"path": str(train), "type": "alpaca"}],
                test_datasets=[{"path": str(evaluation), "type": "alpaca"}],
                val_set_size=0.1,
            )
        )
    text = write_jsonl(volume / "text.jsonl", [{"body": " ".join(["hello world"] * 200)}])
    cfg = config(tokenizer_dir, None, pretraining_dataset=[{"path": str(text), "text_column": "body"}], sequence_len=64)
    pre = prepare(cfg)
    assert pre["rows"]["in"] == 1 and pre["rows"]["samples"] > 5
    assert pre["tokens"]["trained_share"] == 1.0


@pytest.mark.parametrize(
    "content, entry, match",
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
            {"type": "alpaca"},
            r"bad\.jsonl: line 2: not valid JSON",
        ),
        ("", {"type": "alpaca"}, r"bad\.jsonl: the file is empty"),
        (
            '{"instruction": "a", "answer": "b"}\n',
            {"type": "alpaca"},
            r"bad\.jsonl: row 0: field 'output': column missing from the dataset \(it has: instruction, answer\)",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": null}\n',
            {"type": "alpaca"},
            r"bad\.jsonl: row 1: field 'output': missing",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
            {"type": "chat_template"},
            r"bad\.jsonl: row 0: field 'messages\[1\]\.role': unknown role 'bot'",
        ),
    ],
)
def test_data_errors_name_file_row_and_field(volume, tokenizer_dir, content, entry, match):
    path = volume / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        prepare(config(tokenizer_dir, [{"path": str(path), **entry}]))


def test_all_rows_dropped_is_an_error_with_counts(volume, tokenizer_dir):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(10, max_words=60))
    with pytest.raises(DataError, match=r"no training rows left: 10 samples from 10 rows, dropped: 10 too_long"):
        prepare(config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}], sequence_len=20))


def test_dataset_num_proc_gives_the_same_rows_and_errors(volume, tokenizer_dir):
    rows = alpaca_rows(4400)
    path = write_jsonl(volume / "a.jsonl", rows)
    entry = [{"path": str(path), "type": "alpaca"}]
    one = prepare(config(tokenizer_dir, entry, dataset_num_proc=1, shuffle_merged_datasets=False))
    two = prepare(
        config(
            tokenizer_dir,
            entry,
            dataset_num_proc=2,
            shuffle_merged_datasets=False,
            dataset_prepared_path=str(volume / "two"),
        )
    )
    assert list(load_prepared(one["cache_dir"]).train["input_ids"]) == list(
        load_prepared(two["cache_dir"]).train["input_ids"]
    )
    rows[3500]["output"] = None  # in the second worker's half: the error crosses the process boundary intact
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"a\.jsonl: row 3500: field 'output': missing") as e:
        prepare(config(tokenizer_dir, entry, dataset_num_proc=2))
    assert e.value.details == {"source": str(path), "row": 3500, "field": "output"}
    # carried back as a row, not raised through the pool (whose terminate can hang): no worker traceback behind it
    assert e.value.__cause__ is None


def crash_at_row_3500(batch, indices, strategy, source, offset=0):
    """pipeline.tokenize_batch with a bug at one row (a KeyError, not the data's fault)."""
    if 3500 in [i + offset for i in indices]:
        raise KeyError("output")
    return original_tokenize_batch(batch, indices, strategy=strategy, source=source, offset=offset)


def test_a_bug_in_a_worker_process_ends_the_stage_with_its_type_not_through_the_pool(
    volume, tokenizer_dir, monkeypatch, capfd
):
    """Any exception a tokenizing worker raises comes back as a row too: raised through datasets' pool, the pool's
    terminate can hang (huggingface/datasets#6393) until the stage's deadline, which a user pays for."""
    from worker.data import pipeline, rows

    monkeypatch.setattr(pipeline, "tokenize_batch", crash_at_row_3500)
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(4400))
    with pytest.raises(rows.WorkerCrash, match=r"^KeyError: 'output' \(in a tokenizing worker process") as e:
        prepare(config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}], dataset_num_proc=2))
    assert e.value.__cause__ is None  # carried back as a row, not raised through the pool
    assert "in crash_at_row_3500" in capfd.readouterr().err  # the worker's traceback, in the log


def test_a_folder_cannot_reach_outside_itself(volume, tokenizer_dir, tmp_path):
    outside = write_jsonl(tmp_path / "secret.jsonl", alpaca_rows(3))
    folder = volume / "folder"
    write_jsonl(folder / "ok.jsonl", alpaca_rows(4))
    (folder / "link.jsonl").symlink_to(outside)
    summary = prepare(config(tokenizer_dir, [{"path": str(folder), "type": "alpaca"}]))
    assert summary["rows"]["in"] == 4  # the link out of the folder is not read
    with pytest.raises(DataError, match="data_files outside the dataset folder"):
        prepare(config(tokenizer_dir, [{"path": str(folder), "data_files": ["../../secret.jsonl"], "type": "alpaca"}]))


def test_empty_shards_of_a_folder_are_skipped_and_an_all_empty_folder_is_named(volume, tokenizer_dir):
    folder = volume / "export"
    write_jsonl(folder / "part-0.jsonl", alpaca_rows(4))
    (folder / "part-1.jsonl").write_text("")  # Spark/Dask exports leave empty parts
    assert prepare(config(tokenizer_dir, [{"path": str(folder), "type": "alpaca"}]))["rows"]["in"] == 4
    (folder / "part-0.jsonl").write_text("")
    with pytest.raises(DataError, match="export: every data file is empty"):
        prepare(config(tokenizer_dir, [{"path": str(folder), "type": "alpaca"}]))


@pytest.mark.parametrize(
    "name, text",
    [("a.jsonl", "\n\n  \n"), ("a.json", "[]"), ("a.csv", "instruction,output\n")],
    ids=["whitespace-jsonl", "empty-json-list", "csv-header-only"],
)
def test_a_file_that_holds_no_rows_says_the_dataset_is_empty(volume, tokenizer_dir, name, text):
    """It used to say datasets' 'Instruction "train" corresponds to no data!'."""
    path = volume / name
    path.write_text(text)
    with pytest.raises(DataError, match=f"{name}: the dataset is empty: its files hold no rows"):
        prepare(config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}]))


def test_chunked_tokenisation_keeps_order_and_row_numbers(volume, tokenizer_dir, monkeypatch, capsys):
    import worker.data.pipeline as pipeline

    rows = alpaca_rows(50)
    path = write_jsonl(volume / "a.jsonl", rows)
    entry = [{"path": str(path), "type": "alpaca"}]
    whole = prepare(config(tokenizer_dir, entry, shuffle_merged_datasets=False))
    monkeypatch.setattr(pipeline, "ROWS_PER_CHUNK", 7)
    monkeypatch.setattr(pipeline, "MAX_CHUNKS", 5)  # 8 chunks of 7 rows would start the worker pool 8 times
    capsys.readouterr()
    chunked = prepare(
        config(tokenizer_dir, entry, shuffle_merged_datasets=False, dataset_prepared_path=str(volume / "chunked"))
    )
    assert [line.split()[2] for line in capsys.readouterr().err.splitlines() if "] tokenized " in line] == [
        "10/50",
        "20/50",
        "30/50",
        "40/50",
        "50/50",
    ]
    assert list(load_prepared(chunked["cache_dir"]).train["input_ids"]) == list(
        load_prepared(whole["cache_dir"]).train["input_ids"]
    )
    rows[45]["output"] = None  # in the last chunk: its row number counts the chunks before it
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"row 45: field 'output'"):
        prepare(config(tokenizer_dir, entry))

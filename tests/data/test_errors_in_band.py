"""A datasets.map worker's DataError comes back to the parent as a row (worker/data/rows.py `errors_in_band`), not as
an exception through the pool: a pool whose worker raised is terminated, and that terminate can hang
(huggingface/datasets#6393), which would leave the preprocess stage waiting for its deadline."""

from __future__ import annotations

import pyarrow as pa
import pytest

from worker.data import rl_rows, rows
from worker.errors import DataError


def tokenize(batch, indices, strategy, source, offset=0):
    """A stand-in for pipeline.tokenize_batch: row 2 of the source has no answer."""
    if 2 in [i + offset for i in indices]:
        raise DataError("a.jsonl: row 2: field 'output': missing", "fix it", details={"row": 2, "field": "output"})
    return {"input_ids": [[1, 2]] * len(indices), "labels": [[1, 2]] * len(indices), "_source": [source] * len(indices),
            "_row": [i + offset for i in indices]}  # fmt: skip


def table(out: dict, features) -> pa.Table:
    return pa.Table.from_pydict(out, schema=features.arrow_schema)


@pytest.mark.parametrize("features", [rows.sample_features(), rl_rows.features()], ids=["samples", "rl rows"])
def test_a_workers_data_error_is_a_row_the_parent_raises_whole(features):
    carried = rows.with_error(features)
    out = rows.errors_in_band({"x": [0, 0]}, [1, 2], tokenize, features, strategy=None, source=0)
    assert len(out[rows.ERROR]) == 1 and all(len(column) == 1 for column in out.values())  # one row, every column
    with pytest.raises(DataError, match="row 2: field 'output': missing") as e:
        rows.raise_carried(table(out, carried))
    assert e.value.hint == "fix it" and e.value.details == {"row": 2, "field": "output"}


def test_without_an_error_the_rows_come_back_as_they_were():
    features = rows.sample_features()
    out = rows.errors_in_band({"x": [0, 0]}, [0, 1], tokenize, features, strategy=None, source=3)
    back = rows.raise_carried(table(out, rows.with_error(features)))
    assert back.column_names == list(features) and back.column("_row").to_pylist() == [0, 1]


def test_the_earliest_rows_error_is_the_one_raised():
    features = rows.with_error(rows.sample_features())
    ok = rows.errors_in_band({"x": [0]}, [0], tokenize, rows.sample_features(), strategy=None, source=0)
    first = rows.errors_in_band({"x": [0]}, [0], tokenize, rows.sample_features(), strategy=None, source=0, offset=2)
    later = {**first, rows.ERROR: [first[rows.ERROR][0].replace("row 2", "row 9")]}
    with pytest.raises(DataError, match="row 2:"):
        rows.raise_carried(pa.concat_tables([table(ok, features), table(first, features), table(later, features)]))


def crashing(batch, indices, strategy, source, offset=0):
    """A stand-in for pipeline.tokenize_batch with a bug: a KeyError at row 5."""
    if 5 in [i + offset for i in indices]:
        raise KeyError("input")
    return tokenize(batch, indices, strategy, source, offset)


def test_any_other_exception_is_carried_too_and_raised_with_its_type_and_traceback(capsys):
    features = rows.sample_features()
    out = rows.errors_in_band({"x": [0, 0]}, [4, 5], crashing, features, strategy=None, source=0)
    assert len(out[rows.ERROR]) == 1  # one row, not an exception through the pool
    with pytest.raises(rows.WorkerCrash, match=r"^KeyError: 'input' \(in a tokenizing worker process") as e:
        rows.raise_carried(table(out, rows.with_error(features)))
    assert not isinstance(e.value, DataError)  # a bug of the code, reported as a crash, not as the user's data
    assert "in crashing" in capsys.readouterr().err  # the worker's own traceback, in the log

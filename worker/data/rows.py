"""Row-level passes over tokenised samples as Arrow tables (input_ids, labels, _source, _row):
length policy, exact deduplication, shuffle and the eval split. Vectorised with numpy/pyarrow.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from worker.data.strategies.base import IGNORE
from worker.errors import DataError


def sample_features(**extra: str) -> Any:
    """The datasets.Features of tokenised samples: input_ids and labels, the `extra` columns (name=dtype)
    in their order, then the _source/_row tags (for error messages)."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            **{name: datasets.Value(dtype) for name, dtype in extra.items()},
            "_source": datasets.Value("int32"),
            "_row": datasets.Value("int64"),
        }
    )


ERROR = "_error"  # a map worker's exception, carried back as a row (`errors_in_band`)


def with_error(features: Any) -> Any:
    """`features` and the `_error` column that `errors_in_band` fills."""
    import datasets

    return datasets.Features({**features, ERROR: datasets.Value("string")})


class WorkerCrash(RuntimeError):
    """An exception other than a DataError in a tokenizing worker process (a bug, not the data), raised in the
    parent under the worker's exception's type and message; its traceback goes to the log first."""


def errors_in_band(batch: dict[str, list], indices: list[int], fn: Any, features: Any, **kwargs: Any) -> dict:
    """`fn`'s batch in a datasets.map worker process, where an exception it raises comes back as one row holding it
    in `_error` (the other columns empty) instead of crossing the pool: a pool whose worker raised is terminated, and
    that can hang (huggingface/datasets#6393), leaving the stage to wait for its deadline. `raise_carried` raises
    it in the parent: a DataError as itself, anything else as a WorkerCrash with the worker's traceback."""
    import datasets

    try:
        out = fn(batch, indices, **kwargs)
        return {**out, ERROR: [None] * len(out["input_ids"])}
    except Exception as e:  # every exception, so that none crosses the pool
        if isinstance(e, DataError):
            carried = json.dumps({"message": e.message, "hint": e.hint, "details": e.details})
        else:
            carried = json.dumps({"crash": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        empty = {
            k: [] if not isinstance(f, datasets.Value) else "" if f.dtype == "string" else 0
            for k, f in features.items()
        }
        return {**{k: [v] for k, v in empty.items()}, ERROR: [carried]}


def raise_carried(table: pa.Table) -> pa.Table:
    """The first exception `errors_in_band` carried (the earliest row's, as one process meets it) raised here; else
    the table without the `_error` column."""
    carried = table.column(ERROR).drop_null()
    if len(carried):
        error = json.loads(carried[0].as_py())
        if "crash" in error:
            sys.stderr.write(f"a tokenizing worker process raised:\n{error['traceback']}")
            raise WorkerCrash(f"{error['crash']} (in a tokenizing worker process; its traceback is in the log)")
        raise DataError(error["message"], error["hint"], stage="preprocess", details=error["details"])
    return table.drop_columns([ERROR])


def batch_rows(batch: dict[str, list], indices: list[int], offset: int) -> tuple[list[dict], list[int]]:
    """A datasets.map batch (columns) as row dicts, with each row's index in its whole source."""
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*batch.values())], [i + offset for i in indices]


def lengths(table: pa.Table) -> np.ndarray:
    return pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)


def trained_counts(table: pa.Table) -> np.ndarray:
    labels = table.column("labels").combine_chunks()
    flat = (pc.list_flatten(labels).to_numpy(zero_copy_only=False) != IGNORE).astype(np.int64)
    ends = np.cumsum(lengths(table))
    totals = np.r_[0, np.cumsum(flat)]
    return totals[ends] - totals[np.r_[0, ends[:-1]]]


def apply_length_policy(
    table: pa.Table, sequence_len: int, strategy: str, min_len: int, sources: list[str], dropped: Counter
) -> pa.Table:
    """excess_length_strategy drop|truncate|raise, then min_sample_len, then samples with nothing to train.

    Counts go to `dropped` by reason; truncated (kept) samples are counted under "truncated"."""
    too_long = lengths(table) > sequence_len
    if too_long.any():
        if strategy == "raise":
            first = int(np.argmax(too_long))
            source, row = sources[table.column("_source")[first].as_py()], table.column("_row")[first].as_py()
            raise DataError(
                f"{source}: row {row}: {int(lengths(table)[first])} tokens, more than sequence_len {sequence_len} "
                f"({int(too_long.sum())} such rows)",
                hint="raise sequence_len, or set excess_length_strategy: drop or truncate",
                stage="preprocess",
                details={"source": source, "row": row, "field": "input_ids"},
            )
        if strategy == "truncate":
            dropped["truncated"] += int(too_long.sum())
            table = table.set_column(
                table.schema.get_field_index("input_ids"),
                "input_ids",
                pc.list_slice(table.column("input_ids"), 0, sequence_len),
            )
            table = table.set_column(
                table.schema.get_field_index("labels"), "labels", pc.list_slice(table.column("labels"), 0, sequence_len)
            )
        else:
            dropped["too_long"] += int(too_long.sum())
            table = table.filter(pa.array(~too_long))
    too_short = lengths(table) < min_len
    dropped["too_short"] += int(too_short.sum())
    table = table.filter(pa.array(~too_short))
    untrained = trained_counts(table) == 0
    dropped["no_trained_tokens"] += int(untrained.sum())
    return table.filter(pa.array(~untrained))


def row_digests(table: pa.Table) -> list[bytes]:
    ends = np.cumsum(lengths(table))
    starts = np.r_[0, ends[:-1]]
    ids = pc.list_flatten(table.column("input_ids").combine_chunks()).to_numpy(zero_copy_only=False).astype(np.int32)
    labels = pc.list_flatten(table.column("labels").combine_chunks()).to_numpy(zero_copy_only=False).astype(np.int32)
    return [
        hashlib.blake2b(ids[a:b].tobytes() + b"|" + labels[a:b].tobytes(), digest_size=16).digest()
        for a, b in zip(starts.tolist(), ends.tolist())
    ]


def deduplicate(
    table: pa.Table, dropped: Counter, seen: set[bytes] | None = None, reason: str = "duplicate"
) -> tuple[pa.Table, set[bytes]]:
    """Keep the first of identical samples (same input_ids and labels); `seen` also removes those."""
    seen = set() if seen is None else set(seen)
    keep = np.zeros(table.num_rows, dtype=bool)
    for i, digest in enumerate(row_digests(table)):
        if digest not in seen:
            seen.add(digest)
            keep[i] = True
    dropped[reason] += int((~keep).sum())
    return table.filter(pa.array(keep)), seen


def shuffle(table: pa.Table, seed: int) -> pa.Table:
    return table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))


def split_eval(table: pa.Table, val_set_size: float, seed: int) -> tuple[pa.Table, pa.Table | None]:
    """val_set_size: a fraction in (0, 1) or a whole number of rows; a seeded random choice."""
    if val_set_size <= 0:
        return table, None
    n = table.num_rows
    k = int(round(val_set_size * n)) if val_set_size < 1 else int(val_set_size)
    if k < 1 or k >= n:
        raise DataError(
            f"val_set_size {val_set_size} of {n} prepared rows gives {k} eval rows; need at least 1 and fewer than {n}",
            hint="use a larger dataset, a different val_set_size, or test_datasets",
        )
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed + 1).choice(n, k, replace=False)] = True
    return table.filter(pa.array(~chosen)), table.filter(pa.array(chosen))

"""Preprocess for `rl:` configs: preference pairs, KTO completions or GRPO prompts into the prepared cache.

The SFT pipeline (worker/data/pipeline.py) runs as for any config (sources, fingerprint, cache,
dedup, shuffle, eval split); what differs is one table row per dataset row, whatever the method:
- pairs (dpo, ipo, orpo, simpo): `input_ids`/`labels` hold chosen then rejected, `_split` where
  rejected starts. Dedup, shuffle and the eval split therefore keep a pair together.
- kto: one completion, `_flag` 1 when desirable. grpo: the rendered prompt, `_answer` its answer.
- ebft: one document (worker/data/ebft_rows.py): prompt masked, then the trained ground truth; the
  SFT length policy applies to it whole, and a strided document with no room for one block goes.
The length policy applies to each sequence (chosen and rejected each within sequence_len).

Layout (docs/contracts.md): pairs and kto samples go micro_batch_size at a time into one packed
row (position_ids restart at every sequence, so chosen and rejected of a pair run in one forward
with per-sample attention and no padding); a pair's chosen is always the sequence right before its
rejected. kto rows carry `desirable` (one flag per sequence). grpo rows are one prompt each with its
answer as UTF-8 bytes (`answer_bytes`: batches carry tensors only). ebft rows are one document each.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.config import TrainingConfig
from schemas.rl import PAIR_METHODS
from worker.data import rows
from worker.data.packing import pack_columns
from worker.errors import DataError


def features() -> Any:
    return rows.sample_features(_split="int32", _flag="int32", _answer="string")


def tokenize_batch(
    batch: dict[str, list], indices: list[int], strategy: Any, source: int, offset: int = 0
) -> dict[str, list]:
    """One datasets.map batch → one table row per dataset row (see the module docstring)."""
    raw, indices = rows.batch_rows(batch, indices, offset)
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "_split", "_flag", "_answer", "_source", "_row")}
    for index, s in zip(indices, strategy.tokenize_rows(raw, indices)):
        second = s.rejected
        out["input_ids"].append(s.chosen.input_ids + (second.input_ids if second else []))
        out["labels"].append(s.chosen.labels + (second.labels if second else []))
        out["_split"].append(len(s.chosen.input_ids))
        out["_flag"].append(int(s.desirable))
        out["_answer"].append(s.answer)
        out["_source"].append(source)
        out["_row"].append(index)
    return out


def flat(table: pa.Table, name: str) -> np.ndarray:
    return pc.list_flatten(table.column(name).combine_chunks()).to_numpy(zero_copy_only=False)


def sequences(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of every sequence in the flattened tokens: chosen and rejected of each row apart."""
    ends = np.cumsum(rows.lengths(table))
    starts = np.r_[0, ends[:-1]]
    split = table.column("_split").to_numpy().astype(np.int64)
    first = np.minimum(split, ends - starts)
    both = np.stack([starts, starts + first], axis=1).reshape(-1)
    lengths = np.stack([first, ends - starts - first], axis=1).reshape(-1)
    keep = lengths > 0
    return both[keep], lengths[keep]


def length_policy(table: pa.Table, cfg: TrainingConfig, labels: list[str], dropped: Counter) -> pa.Table:
    if cfg.rl == "ebft":
        return ebft_length_policy(table, cfg, labels, dropped)
    return pair_length_policy(table, cfg, labels, dropped)


def prompt_lengths(table: pa.Table) -> np.ndarray:
    """Per row, the tokens before the first trained label (the prompt); 0 for a row trained from its start."""
    n = rows.lengths(table)
    starts = np.r_[0, np.cumsum(n)[:-1]]
    trained = np.flatnonzero(flat(table, "labels") != -100)
    first = n.copy()
    row_of = np.searchsorted(starts, trained, side="right") - 1
    np.minimum.at(first, row_of, trained - starts[row_of])
    return np.where(first <= 1, 0, first)  # a document's first token has no context: trained from token 1 is no prompt


def ebft_length_policy(table: pa.Table, cfg: TrainingConfig, labels: list[str], dropped: Counter) -> pa.Table:
    """The SFT policy on the whole document; strided: then documents too short for one block
    (anchor after max(prompt + min_completion_prefix, context_length), generate_max_len tokens after it)."""
    table = rows.apply_length_policy(
        table, cfg.sequence_len, cfg.excess_length_strategy, cfg.min_sample_len, labels, dropped
    )
    ebft = cfg.ebft
    if ebft is None or ebft.mode != "strided" or table.num_rows == 0:
        return table
    prompt = prompt_lengths(table)
    first_anchor = np.maximum(np.where(prompt > 0, prompt + ebft.min_completion_prefix, 0), ebft.context_length)
    short = rows.lengths(table) < first_anchor + ebft.generate_max_len
    dropped["no_room_for_a_block"] += int(short.sum())
    return table.filter(pa.array(~short))


def pair_length_policy(table: pa.Table, cfg: TrainingConfig, labels: list[str], dropped: Counter) -> pa.Table:
    """excess_length_strategy per sequence (a pair goes when either side does; truncate cuts each side;
    a grpo prompt needs room for trl.max_completion_length and is never cut), then rows with a side
    that trains nothing."""
    total = rows.lengths(table)
    first = np.minimum(table.column("_split").to_numpy().astype(np.int64), total)
    if cfg.rl == "grpo":
        too_long = first + (cfg.trl.max_completion_length if cfg.trl else 256) > cfg.sequence_len
    else:
        too_long = (first > cfg.sequence_len) | (total - first > cfg.sequence_len)
    strategy = "drop" if cfg.rl == "grpo" and cfg.excess_length_strategy == "truncate" else cfg.excess_length_strategy
    if too_long.any() and strategy == "raise":
        i = int(np.argmax(too_long))
        source, row = labels[table.column("_source")[i].as_py()], table.column("_row")[i].as_py()
        room = " with room for trl.max_completion_length" if cfg.rl == "grpo" else ""
        raise DataError(
            f"{source}: row {row}: longer than sequence_len {cfg.sequence_len}{room} ({int(too_long.sum())} such rows)",
            hint="raise sequence_len, or set excess_length_strategy: drop (or truncate, for pairs)",
            stage="preprocess",
            details={"source": source, "row": row, "field": "input_ids"},
        )
    if too_long.any() and strategy == "truncate":
        dropped["truncated"] += int(too_long.sum())
        table = truncate_sides(table, cfg.sequence_len)
    elif too_long.any():
        dropped["too_long"] += int(too_long.sum())
        table = table.filter(pa.array(~too_long))
    if cfg.rl == "grpo" or table.num_rows == 0:
        return table
    starts, _ = sequences(table)
    trained = np.add.reduceat((flat(table, "labels") != -100).astype(np.int64), starts)
    untrained = (trained.reshape(table.num_rows, -1) == 0).any(axis=1)
    dropped["no_trained_tokens"] += int(untrained.sum())
    return table.filter(pa.array(~untrained))


def truncate_sides(table: pa.Table, limit: int) -> pa.Table:
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    split = table.column("_split").to_pylist()
    for k in range(len(ids)):
        s = split[k]
        ids[k] = ids[k][:s][:limit] + ids[k][s:][:limit]
        labels[k] = labels[k][:s][:limit] + labels[k][s:][:limit]
        split[k] = min(s, limit)
    for name, values in (("input_ids", ids), ("labels", labels), ("_split", split)):
        kind = pa.int32() if name == "_split" else pa.list_(pa.int32())
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))
    return table


def layout(table: pa.Table, cfg: TrainingConfig) -> tuple[pa.Table, dict[str, Any]]:
    """micro_batch_size pairs (or kto samples) per packed row; grpo: one prompt per row; ebft: one document per row."""
    if cfg.rl == "ebft":
        return pack_columns(table, [[i] for i in range(table.num_rows)]), {
            "enabled": False,
            "fill": None,
            "bins": table.num_rows,
        }
    if cfg.rl == "grpo":
        out = pack_columns(table, [[i] for i in range(table.num_rows)])
        answers = [
            list(a.encode("utf-8")) for a in table.column("_answer").to_pylist()
        ]  # bytes: batches carry tensors only
        return out.append_column("answer_bytes", pa.array(answers, pa.list_(pa.int32()))), {
            "enabled": False,
            "fill": None,
            "bins": table.num_rows,
        }
    starts, lengths = sequences(table)
    ids, labels = flat(table, "input_ids"), flat(table, "labels")
    offsets = (
        pa.array(np.r_[starts, starts[-1] + lengths[-1]].astype(np.int32)) if len(starts) else pa.array([0], pa.int32())
    )
    seqs = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels, pa.int32())),
        }
    )
    per_row = 2 if cfg.rl in PAIR_METHODS else 1
    mbs = cfg.batch_shape()[0]
    bins = [list(range(r * per_row, min(r + mbs, table.num_rows) * per_row)) for r in range(0, table.num_rows, mbs)]
    out = pack_columns(seqs, bins)
    if cfg.rl == "kto":
        flags = table.column("_flag").to_numpy()
        out = out.append_column("desirable", pa.array([[int(flags[i]) for i in b] for b in bins], pa.list_(pa.int32())))
    capacity = mbs * per_row * cfg.sequence_len
    return out, {
        "enabled": True,
        "fill": round(float(lengths.sum()) / max(1, len(bins) * capacity), 4),
        "bins": len(bins),
        "capacity": capacity,
        "per_bin": mbs,
    }

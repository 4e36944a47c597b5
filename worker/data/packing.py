"""Sample packing: samples into bins of `capacity` tokens (micro_batch_size × sequence_len).

`first_fit_decreasing` places the longest samples first, each into the first open bin where it
fits (a max-segment-tree over the bins' free space finds that bin in O(log n)), with at most
`max_per_bin` samples per bin. `next_fit` (fill a bin in the given order, open a new one when the
next sample does not fit) is the simple baseline the bench compares with. `pack_columns` lays the
bins out as rows: the samples back to back, position_ids restarting at 0 at each sample, so the
trainer splits attention per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_TOKENS_PER_CHUNK = 1 << 28  # int32 list offsets: an Arrow chunk stays far below 2**31 values


def first_fit_decreasing(
    lengths: Sequence[int] | np.ndarray, capacity: int, max_per_bin: int = 1 << 30
) -> list[list[int]]:
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    if lengths.max() > capacity or lengths.min() < 1:
        raise ValueError(f"sample lengths must be in [1, {capacity}]")
    size = 1 << max(0, (n - 1).bit_length())
    free = [capacity] * (2 * size)  # free[node] = max free space of the bins under node
    counts = [0] * n
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[i])
        node = 1
        while node < size:  # leftmost leaf with room: the first bin that fits (a new one if none)
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        counts[b] += 1
        free[node] = 0 if counts[b] >= max_per_bin else free[node] - need
        node //= 2
        while node:  # refresh the maxima above; stop where they no longer change
            best = max(free[2 * node], free[2 * node + 1])
            if free[node] == best:
                break
            free[node] = best
            node //= 2
    return bins


def next_fit(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room = 0
    for i, length in enumerate(np.asarray(lengths).tolist()):
        if length > room:
            bins.append([])
            room = capacity
        bins[-1].append(i)
        room -= length
    return bins


def fill(lengths: np.ndarray, bins: list[list[int]], capacity: int) -> float:
    return float(np.asarray(lengths).sum() / (len(bins) * capacity)) if bins else 0.0


def pack_columns(table: pa.Table, bins: list[list[int]]) -> pa.Table:
    """Rows of `table` (input_ids, labels) regrouped: one output row per bin, + position_ids."""
    chunks = []
    start = 0
    sizes = pc.list_value_length(table.column("input_ids")).to_numpy()
    while start < len(bins):
        stop, tokens = start, 0
        while stop < len(bins) and (stop == start or tokens + sizes[bins[stop]].sum() <= MAX_TOKENS_PER_CHUNK):
            tokens += int(sizes[bins[stop]].sum())
            stop += 1
        chunks.append(pack_chunk(table, bins[start:stop]))
        start = stop
    return pa.concat_tables(chunks)


def pack_chunk(table: pa.Table, bins: list[list[int]]) -> pa.Table:
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    taken = table.take(order)
    lengths = pc.list_value_length(taken.column("input_ids")).to_numpy().astype(np.int64)
    per_bin = np.fromiter((len(b) for b in bins), dtype=np.int64)
    bin_tokens = np.add.reduceat(lengths, np.r_[0, np.cumsum(per_bin)[:-1]]) if len(bins) else np.zeros(0, np.int64)
    offsets = pa.array(np.r_[0, np.cumsum(bin_tokens)].astype(np.int32))
    sample_starts = np.r_[0, np.cumsum(lengths)[:-1]]
    positions = (np.arange(lengths.sum(), dtype=np.int64) - np.repeat(sample_starts, lengths)).astype(np.int32)
    columns = {}
    for name in ("input_ids", "labels"):
        flat = pc.list_flatten(taken.column(name).combine_chunks()).cast(pa.int32())
        columns[name] = pa.ListArray.from_arrays(offsets, flat)
    columns["position_ids"] = pa.ListArray.from_arrays(offsets, pa.array(positions))
    return pa.table(columns)

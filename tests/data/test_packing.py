"""Packing: every sample exactly once, no bin over capacity or sample count, position_ids restart
at each sample, the tokens unchanged; and the fill on a lognormal length mix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.data.packing import fill, first_fit_decreasing, next_fit, pack_columns


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=300),
    capacity=st.integers(64, 200),
    max_per_bin=st.integers(1, 20),
)
def test_ffd_places_every_sample_once_within_capacity(lengths, capacity, max_per_bin):
    bins = first_fit_decreasing(lengths, capacity, max_per_bin)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity and 1 <= len(b) <= max_per_bin for b in bins)


def test_pack_columns_concatenates_samples_and_restarts_positions():
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 500, size=int(n)).tolist() for n in rng.integers(1, 40, size=200)]
    labels = [[-100] + s[1:] for s in samples]
    table = pa.table({"input_ids": samples, "labels": labels})
    bins = first_fit_decreasing([len(s) for s in samples], 128, 50)
    packed = pack_columns(table, bins).to_pylist()
    assert len(packed) == len(bins)
    for row, b in zip(packed, bins):
        assert row["input_ids"] == [t for i in b for t in samples[i]]
        assert row["labels"] == [t for i in b for t in labels[i]]
        assert row["position_ids"] == [p for i in b for p in range(len(samples[i]))]
        assert len(row["input_ids"]) <= 128


def test_fill_on_a_lognormal_mix_beats_next_fit_and_reaches_97_percent():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, 20_000).astype(int), 16, 2048)
    ffd = first_fit_decreasing(lengths, 2048, 200)
    baseline = next_fit(lengths, 2048)
    print(
        f"fill: ffd {fill(lengths, ffd, 2048):.4f} ({len(ffd)} bins), next-fit {fill(lengths, baseline, 2048):.4f} "
        f"({len(baseline)} bins)"
    )
    assert fill(lengths, ffd, 2048) >= 0.97
    assert len(ffd) < len(baseline)

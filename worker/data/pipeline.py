"""Preprocess: datasets → prompt strategy → length policy → dedup, shuffle, split → packing → cache.

    summary = prepare(cfg)      # what `ftw preprocess CONFIG` and `python -m worker.data` run

1. tokenizer and sources resolved (remote files downloaded, content hashed) → fingerprint;
   a complete cache with that fingerprint is used as is.
2. under the fingerprint's lock: each source loaded and tokenised by its strategy (datasets.map,
   dataset_num_proc processes), the length policy applied, duplicates removed, the merged rows
   shuffled (seed) and split for eval (val_set_size) unless test_datasets give the eval rows.
3. packed (sample_packing / eval_sample_packing) or one sample per row, written with
   position_ids, manifest last, renamed into place.
The summary (also the manifest's content) counts rows in / kept / dropped by reason, tokens, the
trained-token share and the packing fill.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.config import TrainingConfig
from schemas.datasets import DatasetConfig
from worker.data import cache, rl_rows, rows, sources
from worker.data.ebft_rows import EbftRows
from worker.data.packing import fill, first_fit_decreasing, pack_columns
from worker.data.phases import Progress
from worker.data.preference import build_rl_strategy
from worker.data.strategies import Context, build_strategy
from worker.data.tokenizer import load_tokenizer, tokenizer_digest
from worker.errors import DataError, JobSpecError

ROWS_PER_PROCESS = 2000  # below this, a worker process costs more than it saves
ROWS_PER_CHUNK = 20_000  # one progress event per chunk; a chunk costs one worker-pool start
MAX_CHUNKS = 20  # so a large dataset starts the pool at most this often (progress every 5% or more often)


@dataclass
class Source:
    entry: DatasetConfig
    resolved: sources.Resolved
    skip: int = 0


@dataclass
class Tally:
    rows_in: int = 0
    samples: int = 0
    dropped: Counter = field(default_factory=Counter)


def pretraining_entry(p: Any) -> DatasetConfig:
    return DatasetConfig(
        path=p.path, name=p.name, split=p.split, data_files=p.data_files, type="pretraining", text_column=p.text_column
    )


def dataset_entries(cfg: TrainingConfig) -> tuple[list[tuple[DatasetConfig, int]], list[tuple[DatasetConfig, int]]]:
    train = [(d, 0) for d in cfg.datasets or []] + [
        (pretraining_entry(p), p.skip or 0) for p in cfg.pretraining_dataset or []
    ]
    evaluation = [(d, 0) for d in cfg.test_datasets or []]
    if evaluation and cfg.val_set_size:
        raise JobSpecError("test_datasets and val_set_size are exclusive", hint="remove val_set_size, or test_datasets")
    if not train:
        raise JobSpecError("no datasets to prepare", hint="add datasets (or pretraining_dataset) to the config")
    return train, evaluation


def prepare(cfg: TrainingConfig, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Progress()
    started = time.monotonic()
    root = cache.cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    progress.phase("tokenizer", model=cfg.tokenizer_config or cfg.base_model)
    tokenizer = load_tokenizer(cfg)
    train_entries, eval_entries = dataset_entries(cfg)
    scratch = cache.scratch_dir(root)
    try:
        progress.phase("resolve", datasets=len(train_entries) + len(eval_entries))
        train_sources = [Source(e, sources.resolve(e, scratch / "downloads"), skip) for e, skip in train_entries]
        eval_sources = [Source(e, sources.resolve(e, scratch / "downloads"), skip) for e, skip in eval_entries]
        content_ids = (
            [s.resolved.content_id for s in train_sources] + ["eval"] + [s.resolved.content_id for s in eval_sources]
        )
        fp = cache.fingerprint(cfg, tokenizer_digest(tokenizer), content_ids)
        manifest, built = cache.get_or_build(
            root,
            fp,
            lambda out: build(cfg, tokenizer, train_sources, eval_sources, scratch, out, progress),
            waiting=lambda s: progress.phase("waiting", detail=f"another process is preparing {fp} ({s:.0f}s)"),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    final = root / fp
    summary = {**manifest, "cache_dir": str(final), "built": built, "seconds": round(time.monotonic() - started, 2)}
    progress.phase("done", cache_dir=str(final), built=built)
    return summary


def build(
    cfg: TrainingConfig,
    tokenizer: Any,
    train_sources: list[Source],
    eval_sources: list[Source],
    scratch: Path,
    out: Path,
    progress: Progress,
) -> dict[str, Any]:
    tally = Tally()
    labels = [s.resolved.label for s in train_sources + eval_sources]
    train = tokenize_all(cfg, tokenizer, train_sources, 0, scratch, tally, progress)
    evaluation = (
        tokenize_all(cfg, tokenizer, eval_sources, len(train_sources), scratch, tally, progress)
        if eval_sources
        else None
    )
    progress.phase("filter", samples=tally.samples)
    train = length_policy(cfg, train, labels, tally)
    if evaluation is not None:
        evaluation = length_policy(cfg, evaluation, labels, tally)
    truncated = tally.dropped.pop("truncated", 0)
    if cfg.dataset_exact_deduplication:
        train, seen = rows.deduplicate(train, tally.dropped)
        if evaluation is not None:
            evaluation, _ = rows.deduplicate(evaluation, tally.dropped, seen, reason="eval_duplicate_of_train")
    if cfg.shuffle_merged_datasets:
        train = rows.shuffle(train, cfg.seed)
    if evaluation is None:
        train, evaluation = rows.split_eval(train, cfg.val_set_size, cfg.seed)
    if train.num_rows == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in tally.dropped.items() if n) or "none"
        raise DataError(
            f"no training rows left: {tally.samples} samples from {tally.rows_in} rows, dropped: {reasons}",
            hint=(
                "check sequence_len, excess_length_strategy (truncate keeps long rows), min_sample_len and which "
                "turns are trained"
            ),
        )
    progress.phase("pack", rows=train.num_rows)
    capacity = cfg.batch_shape()[0] * cfg.sequence_len
    eval_packing = cfg.sample_packing if cfg.eval_sample_packing is None else cfg.eval_sample_packing
    lay_out = (
        (lambda table, packing: rl_rows.layout(table, cfg))
        if cfg.rl
        else (lambda table, packing: layout(table, packing, capacity, cfg))
    )
    train_out, train_pack = lay_out(train, cfg.sample_packing)
    splits = {"train": train_out}
    eval_pack: dict[str, Any] = {}
    if evaluation is not None and evaluation.num_rows:
        splits["eval"], eval_pack = lay_out(evaluation, eval_packing)
    progress.phase("save", folder=str(out))
    import datasets

    for name, table in splits.items():
        datasets.Dataset(table).save_to_disk(str(out / name))
    train_lengths = rows.lengths(train)
    trained = int(rows.trained_counts(train).sum())
    return {
        "rows": {
            "in": tally.rows_in,
            "samples": tally.samples,
            "kept": train.num_rows + (evaluation.num_rows if evaluation is not None else 0),
            "train": train.num_rows,
            "eval": evaluation.num_rows if evaluation is not None else 0,
            "dropped": {k: v for k, v in tally.dropped.items() if v},
            "truncated": truncated,
        },
        "tokens": {
            "train": int(train_lengths.sum()),
            "trained": trained,
            "trained_share": round(trained / max(1, int(train_lengths.sum())), 4),
            "eval": int(rows.lengths(evaluation).sum()) if evaluation is not None else 0,
        },
        "packing": {**train_pack, "eval": eval_pack or None},
        "sequence_len": cfg.sequence_len,
        "micro_batch_size": cfg.batch_shape()[0],
        "rl": cfg.rl,
        "sources": [
            {"label": s.resolved.label, "content_id": s.resolved.content_id} for s in train_sources + eval_sources
        ],
    }


def length_policy(cfg: TrainingConfig, table: pa.Table, labels: list[str], tally: Tally) -> pa.Table:
    if cfg.rl:
        return rl_rows.length_policy(table, cfg, labels, tally.dropped)
    return rows.apply_length_policy(
        table, cfg.sequence_len, cfg.excess_length_strategy, cfg.min_sample_len, labels, tally.dropped
    )


def layout(table: pa.Table, packing: bool, capacity: int, cfg: TrainingConfig) -> tuple[pa.Table, dict[str, Any]]:
    """Packed bins (FFD per group of sample_packing_group_size, bins shuffled) or one sample per row."""
    lengths = rows.lengths(table)
    if not packing:
        return pack_columns(table, [[i] for i in range(table.num_rows)]), {
            "enabled": False,
            "fill": None,
            "bins": table.num_rows,
        }
    bins: list[list[int]] = []
    group = cfg.sample_packing_group_size
    for start in range(0, len(lengths), group):
        part = first_fit_decreasing(lengths[start : start + group], capacity, cfg.sample_packing_bin_size)
        bins += [[start + i for i in b] for b in part]
    order = np.random.default_rng(cfg.seed).permutation(len(bins))
    bins = [bins[i] for i in order]
    return pack_columns(table, bins), {
        "enabled": True,
        "fill": round(fill(lengths, bins, capacity), 4),
        "bins": len(bins),
        "capacity": capacity,
    }


def tokenize_batch(
    batch: dict[str, list], indices: list[int], strategy: Any, source: int, offset: int = 0
) -> dict[str, list]:
    """One datasets.map batch → samples, each tagged with its source and row (for error messages)."""
    raw, indices = rows.batch_rows(batch, indices, offset)
    out: dict[str, list] = {"input_ids": [], "labels": [], "_source": [], "_row": []}
    for index, samples in zip(indices, strategy.tokenize(raw, indices)):
        for s in samples:
            out["input_ids"].append(s.input_ids)
            out["labels"].append(s.labels)
            out["_source"].append(source)
            out["_row"].append(index)
    return out


def tokenize_all(
    cfg: TrainingConfig,
    tokenizer: Any,
    items: list[Source],
    first: int,
    scratch: Path,
    tally: Tally,
    progress: Progress,
) -> pa.Table:
    import datasets

    datasets.disable_caching()
    tables = []
    for n, item in enumerate(items):
        label = item.resolved.label
        progress.phase("load", source=label)
        data = sources.load(item.resolved, item.entry, scratch / "hf")
        if item.skip:
            data = data.select(range(min(item.skip, len(data)), len(data)))
        ctx = Context(item.entry, cfg, tokenizer, label)
        strategy = (EbftRows(ctx) if cfg.rl == "ebft" else build_rl_strategy(ctx)) if cfg.rl else build_strategy(ctx)
        missing = [c for c in getattr(strategy, "columns", ()) if c not in data.column_names]
        if missing:
            raise ctx.row_error(
                0,
                missing[0],
                f"column missing from the dataset (it has: {', '.join(data.column_names)})",
                hint="map your columns with the dataset entry's field keys, or pick the matching type",
            )
        procs = max(1, min(cfg.dataset_num_proc or os.cpu_count() or 1, len(data) // ROWS_PER_PROCESS))
        progress.phase("tokenize", source=label, rows=len(data), processes=procs)
        tally.rows_in += len(data)
        tables.append(tokenize_source(data, strategy, first + n, item.skip, procs, label, progress, rl=bool(cfg.rl)))
        tally.samples += tables[-1].num_rows
    return pa.concat_tables(tables)


def tokenize_source(
    data: Any, strategy: Any, source: int, skip: int, procs: int, label: str, progress: Progress, rl: bool = False
) -> pa.Table:
    """datasets.map over chunks of ROWS_PER_CHUNK rows (MAX_CHUNKS at most), with a progress event (rows/s,
    tokens/s, ETA) after each."""
    chunks = min(MAX_CHUNKS, max(1, -(-len(data) // ROWS_PER_CHUNK)))
    tables, done, tokens, started = [], 0, 0, time.monotonic()
    for c in range(chunks):
        part = data.shard(num_shards=chunks, index=c, contiguous=True)
        fn, features = (rl_rows.tokenize_batch, rl_rows.features()) if rl else (tokenize_batch, rows.sample_features())
        kwargs = {"strategy": strategy, "source": source, "offset": skip + done}
        if procs > 1:  # a worker's exception comes back as a row, not through the pool (rows.errors_in_band)
            fn, kwargs, features = (
                rows.errors_in_band,
                {"fn": fn, "features": features, **kwargs},
                rows.with_error(features),
            )
        mapped = part.map(
            fn,
            fn_kwargs=kwargs,
            batched=True,
            batch_size=256,
            with_indices=True,
            remove_columns=part.column_names,
            num_proc=procs if procs > 1 else None,
            features=features,
            new_fingerprint=os.urandom(8).hex(),
            desc=f"tokenizing {Path(label).name or label} ({c + 1}/{chunks})",
        )
        table = mapped.flatten_indices().data.table
        tables.append(rows.raise_carried(table) if procs > 1 else table)
        done += len(part)
        tokens += int(rows.lengths(tables[-1]).sum())
        elapsed = max(time.monotonic() - started, 1e-6)
        progress.rows(
            source=label,
            done=done,
            total=len(data),
            tokens_per_s=round(tokens / elapsed),
            eta_s=round((len(data) - done) * elapsed / done, 1),
        )
    return pa.concat_tables(tables)


def summary_table(s: dict[str, Any]) -> str:
    rows, tokens, packing = s["rows"], s["tokens"], s["packing"]
    dropped = ", ".join(f"{k} {v}" for k, v in rows["dropped"].items()) or "none"
    fill = (
        f"{packing['fill']:.2%} in {packing['bins']} bins of {packing['capacity']} tokens"
        if packing["enabled"]
        else "off"
    )
    lines = [
        ("rows in", f"{rows['in']} ({rows['samples']} samples)"),
        ("kept", f"{rows['kept']} (train {rows['train']}, eval {rows['eval']})"),
        ("dropped", dropped + (f"; truncated {rows['truncated']}" if rows.get("truncated") else "")),
        ("tokens", f"{tokens['train']} train, {tokens['eval']} eval"),
        ("trained tokens", f"{tokens['trained']} ({tokens['trained_share']:.1%} of train)"),
        ("packing", fill),
        ("cache", f"{s['cache_dir']} ({'built' if s['built'] else 'reused'})"),
        ("time", f"{s['seconds']:.1f}s"),
    ]
    return "\n".join(f"{k:>15}  {v}" for k, v in lines)

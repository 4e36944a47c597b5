"""Preprocessing throughput: ftw's pipeline against a plain `datasets.map` + tokenizer, same run.

    .venv/bin/python bench/preprocess.py [--rows 100000] [--num-proc 2]

Synthetic chat rows (1–4 user/assistant turns, lognormal message lengths) on a locally built
ChatML BPE tokenizer (vocab 4096, so a word is about a token). Measured, in this order:
  baseline   datasets.map(batched): apply_chat_template(tokenize=False) + tokenizer → input_ids only
  ftw map    the same map with ftw's chat_template strategy → input_ids + exact labels
  ftw total  `prepare()` end to end: load, tokenise+mask, length policy, packing, save, manifest
  packing    first-fit-decreasing vs next-fit (the simple baseline) on the prepared lengths
Prints a markdown table; ratios are against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

WORDS = [f"w{i}" for i in range(2000)] + ["the", "a", "is", "of", "and", "to", "in", "it", "you", "that"]


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            for role in ("user", "assistant"):
                k = max(1, int(rng.lognormvariate(3.3 if role == "assistant" else 2.8, 0.8)))
                messages.append({"role": role, "content": " ".join(rng.choices(WORDS, k=k))})
        rows.append({"messages": messages})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--sequence-len", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    args = parser.parse_args()

    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from schemas.config import TrainingConfig
    from worker.data import rows as row_ops
    from worker.data.packing import fill, first_fit_decreasing, next_fit
    from worker.data.pipeline import prepare, tokenize_batch
    from worker.data.strategies import Context, build_strategy
    from worker.devtools.tiny import build_tokenizer

    datasets.disable_caching()
    work = Path(tempfile.mkdtemp(prefix="ftw-bench-pre-"))
    os.environ["BASE_VOLUME"] = str(work / "volume")
    rows = synthetic_rows(args.rows)
    data_path = work / "volume" / "chat.jsonl"
    data_path.parent.mkdir(parents=True)
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_dir = build_tokenizer(work / "tok", style="chatml", extra_text=[" ".join(WORDS)] * 4, vocab_size=4096)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = datasets.load_dataset("json", data_files=str(data_path), split="train", cache_dir=str(work / "hf"))
    procs = args.num_proc if args.num_proc > 1 else None

    def baseline(batch):
        texts = [tok.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        return {"input_ids": tok(texts, add_special_tokens=False)["input_ids"]}

    t = time.perf_counter()
    base = data.map(
        baseline, batched=True, batch_size=256, num_proc=procs, remove_columns=data.column_names, new_fingerprint="b"
    )
    base_s = time.perf_counter() - t
    base_tokens = int(sum(len(x) for x in base["input_ids"]))

    cfg = TrainingConfig(
        base_model=str(tok_dir),
        learning_rate=1e-4,
        sequence_len=args.sequence_len,
        micro_batch_size=args.micro_batch_size,
        sample_packing=True,
        dataset_num_proc=args.num_proc,
        datasets=[{"path": str(data_path), "type": "chat_template"}],
    )
    strategy = build_strategy(Context(cfg.datasets[0], cfg, tok, str(data_path)))
    t = time.perf_counter()
    ours = data.map(
        tokenize_batch,
        fn_kwargs={"strategy": strategy, "source": 0},
        batched=True,
        batch_size=256,
        with_indices=True,
        num_proc=procs,
        remove_columns=data.column_names,
        new_fingerprint="o",
    )
    ours_s = time.perf_counter() - t
    assert int(sum(len(x) for x in ours["input_ids"])) == base_tokens, "ftw and the baseline disagree on the tokens"

    t = time.perf_counter()
    summary = prepare(cfg)
    total_s = time.perf_counter() - t

    table = ours.flatten_indices().data.table
    lengths = row_ops.lengths(table)
    lengths = lengths[lengths <= args.sequence_len]
    capacity = args.micro_batch_size * args.sequence_len
    t = time.perf_counter()
    ffd = first_fit_decreasing(lengths, capacity, 200)
    ffd_s = time.perf_counter() - t
    t = time.perf_counter()
    nf = next_fit(lengths[np.random.default_rng(0).permutation(len(lengths))], capacity)
    nf_s = time.perf_counter() - t

    n = args.rows
    print(
        f"\n{n} chat rows, {base_tokens} tokens ({base_tokens / n:.0f}/row), {os.cpu_count()} CPUs, num_proc "
        f"{args.num_proc}\n"
    )
    print("| step | seconds | rows/s | tokens/s | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name, s in (
        ("baseline: datasets.map + apply_chat_template + tokenizer (ids only)", base_s),
        ("ftw strategy in the same map (ids + exact labels)", ours_s),
        ("ftw prepare() end to end (load, mask, filter, pack, save)", total_s),
    ):
        print(f"| {name} | {s:.1f} | {n / s:,.0f} | {base_tokens / s:,.0f} | {base_s / s:.2f}× |")
    print(f"\npacking {len(lengths)} samples into bins of {capacity} tokens:\n")
    print("| packer | seconds | bins | fill |")
    print("|---|---:|---:|---:|")
    print(f"| first-fit-decreasing (ftw) | {ffd_s:.2f} | {len(ffd)} | {fill(lengths, ffd, capacity):.2%} |")
    print(f"| next-fit, shuffled order (baseline) | {nf_s:.2f} | {len(nf)} | {fill(lengths, nf, capacity):.2%} |")
    print(
        f"\nprepare(): trained-token share {summary['tokens']['trained_share']:.1%}, packing fill "
        f"{summary['packing']['fill']:.2%}, "
        f"dropped {summary['rows']['dropped'] or 'none'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`ftw estimate`'s model against every measured GPU row of docs/benchmarks.md (its calibration table).

    .venv/bin/python bench/estimate_check.py            # the table: measured, predicted, ratio
    .venv/bin/python bench/estimate_check.py --json     # the same as JSON
    .venv/bin/python bench/estimate_check.py --tokenizer TOKENIZER.json --data examples/data/greetings.jsonl
                                  # the data-size estimate (characters) against a real tokeniser's count

CPU only, no GPU, in a second: it reads the rows (worker/estimate/calibration.py), predicts each
with worker/estimate/model.py and prints predicted / measured; tests/estimate/test_calibration.py
asserts the same ratios against the tolerances (memory ±15%, tokens/s ±20%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from worker.estimate.calibration import read_doc  # noqa: E402
from worker.estimate.model import MEMORY_TOLERANCE, SPEED_TOLERANCE  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer.json (tokenizers library) to count --data with")
    ap.add_argument("--data", type=Path, nargs="*", default=[REPO / "examples" / "data" / "greetings.jsonl"])
    args = ap.parse_args()
    if args.tokenizer:
        return compare_token_counts(args.tokenizer, args.data)
    out, worst = [], {"tokens_per_s": 0.0, "peak_gib": 0.0}
    for row in read_doc(args.doc):
        speed, peak = row.predicted()
        speed_ratios = [speed / m for m in row.tokens_per_s]
        peak_ratios = [peak / m for m in row.peak_gib]
        worst["tokens_per_s"] = max([worst["tokens_per_s"], *(abs(r - 1) for r in speed_ratios)])
        worst["peak_gib"] = max([worst["peak_gib"], *(abs(r - 1) for r in peak_ratios)])
        out.append(
            {
                "row": row.label,
                "tokens_per_s": row.tokens_per_s,
                "predicted_tokens_per_s": round(speed),
                "speed_ratio": [round(r, 3) for r in speed_ratios],
                "peak_gib": row.peak_gib,
                "predicted_peak_gib": round(peak, 2),
                "peak_ratio": [round(r, 3) for r in peak_ratios],
            }
        )
    if args.json:
        print(json.dumps({"rows": out, "worst_error": worst}, indent=1))
        return 0
    print("| row | tokens/s measured | predicted | pred / meas | peak GiB measured | predicted | pred / meas |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in out:
        fmt = lambda xs: "–".join(f"{x:,.0f}" for x in xs) or "—"  # noqa: E731
        print(
            f"| {r['row']} | {fmt(r['tokens_per_s'])} | {r['predicted_tokens_per_s']:,} | "
            f"{', '.join(f'{x:.2f}' for x in r['speed_ratio']) or '—'} "
            f"| {'–'.join(f'{x:g}' for x in r['peak_gib']) or '—'} | {r['predicted_peak_gib']:.1f} | "
            f"{', '.join(f'{x:.2f}' for x in r['peak_ratio']) or '—'} |"
        )
    print(
        f"\nworst error: tokens/s {worst['tokens_per_s']:.1%} (tolerance {SPEED_TOLERANCE:.0%}), "
        f"peak memory {worst['peak_gib']:.1%} (tolerance {MEMORY_TOLERANCE:.0%}); {len(out)} rows"
    )
    return 0


def compare_token_counts(tokenizer_json: Path, files: list[Path]) -> int:
    """Estimated tokens (characters, worker/estimate/data_tokens.py) against the tokeniser's count of
    every row, chat messages in ChatML (<|im_start|>role\ncontent<|im_end|>\n)."""
    from tokenizers import Tokenizer

    from worker.estimate.data_tokens import estimate_file, sample_rows

    tok = Tokenizer.from_file(str(tokenizer_json))

    def count(value) -> int:
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            return sum(
                len(tok.encode(f"<|im_start|>{m.get('role', '')}\n{m.get('content', '')}<|im_end|>\n").ids)
                for m in value["messages"]
            )
        if isinstance(value, str):
            return len(tok.encode(value).ids)
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        return sum(count(v) for v in value) if isinstance(value, list) else 0

    print("| file | rows | tokens counted | estimated | estimated / counted |")
    print("|---|---:|---:|---:|---:|")
    for path in files:
        counted = sum(count(row) for row, _ in sample_rows(path))
        estimated, rows = estimate_file(path)
        print(f"| {path.name} | {rows:,} | {counted:,} | {estimated:,} | {estimated / counted:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Progress of a preprocess run: one line per phase on stderr, and the same as a progress event
(stage "preprocess", step = phase number of PHASES) for the orchestrator. During tokenisation,
datasets' own progress bar runs on the terminal and `rows` events (step = rows done, total_steps =
rows, tokens_per_s, eta_s) follow each chunk.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from worker.events import emit

PHASES = ("tokenizer", "resolve", "waiting", "load", "tokenize", "filter", "pack", "save", "done")


class Progress:
    def __init__(self, stream: Any = None):
        self.stream = sys.stderr if stream is None else stream
        self.started = time.monotonic()

    def phase(self, name: str, **info: Any) -> None:
        elapsed = time.monotonic() - self.started
        details = " ".join(f"{k}={v}" for k, v in info.items())
        print(f"[preprocess {elapsed:6.1f}s] {name} {details}".rstrip(), file=self.stream, flush=True)
        emit(
            {
                "stage": "preprocess",
                "phase": name,
                "step": PHASES.index(name) + 1,
                "total_steps": len(PHASES),
                "elapsed_s": round(elapsed, 2),
                **info,
            }
        )

    def rows(self, source: str, done: int, total: int, tokens_per_s: float, eta_s: float) -> None:
        print(
            f"[preprocess] tokenized {done}/{total} rows of {source}, {tokens_per_s:.0f} tokens/s, ETA {eta_s:.0f}s",
            file=self.stream,
            flush=True,
        )
        emit(
            {
                "stage": "preprocess",
                "phase": "tokenize",
                "source": source,
                "step": done,
                "total_steps": total,
                "tokens_per_s": tokens_per_s,
                "eta_s": eta_s,
            }
        )

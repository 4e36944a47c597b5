"""What every transfer shares: retries with backoff, byte progress, and the settings from the env.

FTW_PUBLISH_ATTEMPTS   tries per file before a publish or pull fails (default 4)
FTW_PUBLISH_BACKOFF_S  first pause between tries, doubled each time (default 1.0)
FTW_S3_PART_MB         multipart part size and threshold in MiB (default 64)
FTW_S3_CONCURRENCY     parallel parts/files per transfer (default 8)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from worker.events import emit

log = logging.getLogger("ftw.publish")
T = TypeVar("T")


@dataclass(frozen=True)
class TransferSettings:
    attempts: int = 4
    backoff_s: float = 1.0
    part_bytes: int = 64 * 1024 * 1024
    concurrency: int = 8

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TransferSettings:
        def number(name: str, default: float, low: float) -> float:
            try:
                return max(low, float(env.get(name) or default))
            except ValueError:
                return default

        return cls(
            attempts=int(number("FTW_PUBLISH_ATTEMPTS", 4, 1)),
            backoff_s=number("FTW_PUBLISH_BACKOFF_S", 1.0, 0.0),
            part_bytes=int(number("FTW_S3_PART_MB", 64, 5) * 1024 * 1024),
            concurrency=int(number("FTW_S3_CONCURRENCY", 8, 1)),
        )


class Fatal(Exception):
    """Wraps an error that no retry can fix (bad credentials, missing bucket): stop at once."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def with_retries(fn: Callable[[], T], what: str, settings: TransferSettings) -> T:
    """Call `fn` until it succeeds or `settings.attempts` are used; the last error is re-raised.
    An error wrapped in `Fatal` is re-raised (unwrapped) at once."""
    delay = settings.backoff_s
    for attempt in range(1, settings.attempts + 1):
        try:
            return fn()
        except Fatal as e:
            raise e.error from None
        except Exception as e:
            if attempt == settings.attempts:
                raise
            log.warning(
                "%s failed (attempt %d/%d: %s); retrying in %.1fs", what, attempt, settings.attempts, _short(e), delay
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 300 else text[:300] + "…"


ProgressSink = Callable[[dict[str, Any]], None]


class Progress:
    """Counts bytes from several threads; at most every `every_s` logs a line and hands a progress
    event to `sink` (the orchestrator's progress channel; default: worker.events.emit)."""

    def __init__(self, label: str, total_bytes: int, sink: ProgressSink | None = None, every_s: float = 5.0):
        self.label, self.total, self.every_s, self.sink = label, total_bytes, every_s, sink or emit
        self.done = 0
        self.start = self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            self._last = now
        self.report()

    def rewind(self, n: int) -> None:
        """A failed try's bytes no longer count."""
        with self._lock:
            self.done = max(0, self.done - n)

    def report(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else None
        log.info(
            "%s: %.1f/%.1f MiB (%.1f MiB/s%s)",
            self.label,
            self.done / 2**20,
            self.total / 2**20,
            rate / 2**20,
            f", ETA {eta:.0f}s" if eta is not None else "",
        )
        self.sink(
            {
                "stage": "publish",
                "what": self.label,
                "bytes_done": self.done,
                "bytes_total": self.total,
                "bytes_per_s": round(rate),
                "eta_s": round(eta, 1) if eta is not None else None,
            }
        )

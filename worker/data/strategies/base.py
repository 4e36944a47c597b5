"""What every prompt strategy shares: the sample shape, the row context, and row errors.

A strategy turns a batch of raw rows into samples: (input_ids, labels) pairs where labels are
-100 at every position that is not trained. One row may give several samples (completion chunks)
and every problem with a row is a DataError that names the source, the row and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.config import TrainingConfig
from schemas.datasets import DatasetConfig
from worker.errors import DataError, JobSpecError

IGNORE = -100


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Context:
    """What a strategy is built from: the dataset entry, the config, the tokenizer, the source name."""

    dataset: DatasetConfig
    config: TrainingConfig
    tokenizer: Any
    source: str  # file, URI or Hub id, as errors name it

    @property
    def train_on_inputs(self) -> bool:
        return self.dataset.train_on_inputs if self.dataset.train_on_inputs is not None else self.config.train_on_inputs

    def row_error(self, row: int, field: str, problem: str, hint: str = "") -> DataError:
        return DataError(
            f"{self.source}: row {row}: field {field!r}: {problem}",
            hint,
            stage="preprocess",
            details={"source": self.source, "row": row, "field": field},
        )

    def require_str(self, value: Any, row: int, field: str) -> str:
        if value is None:
            raise self.row_error(
                row, field, "missing (null or absent)", f"every row needs {field!r}; fix or remove the row"
            )
        if not isinstance(value, str):
            raise self.row_error(row, field, f"expected text, got {type(value).__name__}")
        return value

    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise JobSpecError(
                "the tokenizer has no eos_token", hint="set special_tokens: {eos_token: ...} in the config"
            )
        return eos

    def lead_ids(self) -> list[int]:
        """Special tokens the tokenizer puts at the start of a text (BOS for Llama-style tokenizers)."""
        ids = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        while ids and ids[-1] == self.tokenizer.eos_token_id:
            ids.pop()
        return ids


class Strategy(Protocol):
    columns: tuple[str, ...]  # columns a source must have

    def tokenize(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[list[Sample]]:
        """One list of samples per row (empty when the row yields nothing)."""
        ...

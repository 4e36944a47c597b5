"""Plain-text strategies: `completion` / pretraining (every token trained, long texts split into
sequence_len chunks) and `input_output` (segments, each trained or not by its `label` flag).

completion starts each text with the tokenizer's leading special tokens (BOS where it adds one)
and ends it with EOS. input_output is the segments' tokens and nothing else (no BOS, no EOS: as
axolotl does, the text is the user's to write); segments are tokenised one by one, so a segment
boundary is a token boundary; train_on_inputs trains every segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.data.strategies.base import IGNORE, Context, Sample


class CompletionStrategy:
    def __init__(self, ctx: Context, field: str):
        self.ctx = ctx
        self.field = field
        self.columns = (field,)
        self.chunk = ctx.config.sequence_len
        self.lead = ctx.lead_ids()
        self.eos = ctx.eos_id()

    def tokenize(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[list[Sample]]:
        texts = [self.ctx.require_str(row.get(self.field), i, self.field) for row, i in zip(rows, indices)]
        out = []
        for ids in self.ctx.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids = self.lead + list(ids) + [self.eos]
            out.append(
                [Sample(ids[k : k + self.chunk], ids[k : k + self.chunk]) for k in range(0, len(ids), self.chunk)]
            )
        return out


class InputOutputStrategy:
    columns = ("segments",)

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def segments(self, row: dict[str, Any], index: int) -> list[tuple[str, bool]]:
        segs = row.get("segments")
        if not isinstance(segs, list) or not segs:
            raise self.ctx.row_error(index, "segments", "expected a non-empty list of {label, text}")
        out = []
        for k, seg in enumerate(segs):
            if not isinstance(seg, dict):
                raise self.ctx.row_error(index, f"segments[{k}]", "expected an object {label, text}")
            text = self.ctx.require_str(seg.get("text"), index, f"segments[{k}].text")
            label = seg.get("label")
            if not isinstance(label, bool):
                raise self.ctx.row_error(index, f"segments[{k}].label", f"expected true/false, got {label!r}")
            out.append((text, label))
        return out

    def tokenize(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[list[Sample]]:
        out = []
        for row, index in zip(rows, indices):
            segs = self.segments(row, index)
            pieces = self.ctx.tokenizer([t for t, _ in segs], add_special_tokens=False)["input_ids"]
            ids: list[int] = []
            labels: list[int] = []
            for (_, trained), piece in zip(segs, pieces):
                ids += piece
                labels += list(piece) if trained or self.ctx.train_on_inputs else [IGNORE] * len(piece)
            out.append([Sample(ids, labels)])
        return out

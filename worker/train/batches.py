"""From the prepared-data cache (worker.data.cache.load_prepared) to micro-batches, in an order that a resumed run can recompute.

The order of an epoch is a permutation seeded by (seed, epoch), extended by wrap-around to a whole
number of optimizer steps (no row is dropped; every rank does the same work, as
DistributedSampler does). Optimizer step `s` takes the next `rows_per_step` rows; its micro-batch
`k` goes to rank `k % world_size`. So the rows of a step depend only on (seed, step), never on how
many processes run or on where a run was interrupted: resuming needs no dataloader state, and one
process with gradient accumulation sees the same global batch as several processes without.

Packed rows (one bin of several samples, position_ids restarting at 0 per sample) are one
micro-batch each and carry no attention mask: transformers splits attention at the position_id
resets (block-diagonal mask for sdpa/eager, varlen for flash/flex). The first token of each
sample is never a target, so no sample learns from its neighbour's last token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class BatchPlan:
    """Which rows every micro-batch of every optimizer step reads."""

    num_rows: int
    rows_per_micro: int
    grad_accum: int
    world_size: int
    seed: int
    shuffle: bool = True

    @property
    def micro_per_step(self) -> int:
        return self.grad_accum * self.world_size

    @property
    def rows_per_step(self) -> int:
        return self.rows_per_micro * self.micro_per_step

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_rows / self.rows_per_step))

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        need = self.steps_per_epoch * self.rows_per_step
        while len(order) < need:
            order += order[: need - len(order)]
        return order

    def micro_batches(self, step: int, rank: int, order: list[int] | None = None) -> list[list[int]]:
        """Row indices of this rank's micro-batches for global optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = order if order is not None else self.epoch_order(epoch)
        start = within * self.rows_per_step
        rows = order[start : start + self.rows_per_step]
        micros = [rows[i : i + self.rows_per_micro] for i in range(0, len(rows), self.rows_per_micro)]
        return micros[rank :: self.world_size]


def collate(rows: list[dict[str, list[int]]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch; padded rows get an attention mask, packed rows do not."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        pos[i, :n] = torch.tensor(r["position_ids"])
        mask[i, :n] = 1
    labels[pos == 0] = IGNORE  # a sample's first token has no context of its own
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not packed:  # packed padding has position 0 everywhere: each pad token is its own 1-token sample
        batch["attention_mask"] = mask
    return batch


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())

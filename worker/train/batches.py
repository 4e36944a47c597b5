"""From the prepared-data cache (worker.data.cache.load_prepared) to micro-batches, in an order that a resumed run
can recompute.

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

`StepBatches` reads and collates each step's micro-batches when the loop comes to it (rows as numpy arrays straight
from Arrow), and on CUDA pins them and queues their copies to the device (non-blocking) while the device still runs
the steps queued before. With the varlen attention
kernel it also computes each micro-batch's segment boundaries there, from the CPU tensors, so no
forward reads them back from the device (kernels/ftw_kernels/attention.py); with the fused loss of the supervised
objective, the rows that carry a loss (`target_rows`, kernels/ftw_kernels/cross_entropy.py), which are all the loss
head computes.

Padding-free batches (`padding_free`): an unpacked supervised run with the varlen attention joins each micro-batch's
samples end to end into one packed row, as packing's bins are, so no layer computes a padding token; the loss, a sum
over target tokens divided by the step's count, is the padded batch's. With gradient accumulation the step's samples
are also joined across its micro-batches (`joined`), into as few rows as the run's largest micro-batch holds
(`largest_micro_tokens`): the same samples, the same loss and gradient, and no micro-batch larger than one the run
trains anyway, so the same peak memory; but fewer forward and backward passes, each of which costs the host the same
launches whatever its tokens (a short micro-batch waits for them: docs/estimate.md, the host floor). Several ranks
each run as many passes as the rank that needs most (`ranks_passes`).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from schemas.config import TrainingConfig

IGNORE = -100
FLATTENED = ("input_ids", "labels", "position_ids")  # the columns of a supervised row, joined by `collate(flatten=)`
# the loss head gathers its target rows when at least this share of a micro-batch's rows has none: the gather and its
# grad's scatter move ~6 hidden-sized rows a row, ~0.4% of the head's GEMMs at 1B (vocabulary 128k, hidden 2,048)
GATHER_MIN_SKIPPED = 0.01
JOIN_ENV = "FTW_JOIN_STEPS"  # "0": a step's accumulated micro-batches stay a pass each (`join_budget`)


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


def padded(rows: list[dict], key: str, width: int, fill: int) -> torch.Tensor:
    """Column `key` of `rows` as one int64 tensor, each row from the left of its `width`, the rest `fill`. Built in
    numpy, which copies from the read-only Arrow views of `Rows` without a warning and a row in one assignment."""
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row[key])] = row[key]
    return torch.from_numpy(out)


def collate(
    rows: list[dict[str, list[int]]], pad_id: int, packed: bool, pad_to: int | None = None, flatten: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch; padded rows get an attention mask, packed rows do not.
    `pad_to`: the width every micro-batch is padded to (pad_to_sequence_len), else its longest row's.
    `flatten`: the rows (one sample each) joined end to end into one packed row, no padding (`padding_free`)."""
    if flatten:
        rows, packed = [{k: np.concatenate([np.asarray(r[k]) for r in rows]) for k in FLATTENED}], True
    width = max(max(len(r["input_ids"]) for r in rows), pad_to or 0)
    pos = padded(rows, "position_ids", width, 0)
    labels = padded(rows, "labels", width, IGNORE)
    labels[pos == 0] = IGNORE  # a sample's first token has no context of its own (and padding sits at position 0)
    batch = {"input_ids": padded(rows, "input_ids", width, pad_id), "labels": labels, "position_ids": pos}
    if "desirable" in rows[0]:  # kto: one flag per sequence of the packed rows
        batch["desirable"] = torch.from_numpy(np.concatenate([np.asarray(r["desirable"], np.int64) for r in rows]))
    if "answer_bytes" in rows[0]:  # grpo: each prompt's answer, UTF-8 bytes padded with -1
        batch["answer_bytes"] = padded(rows, "answer_bytes", max(1, max(len(r["answer_bytes"]) for r in rows)), -1)
    if not packed:  # packed padding has position 0 everywhere: each pad token is its own 1-token sample
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
    return batch


def largest_micro_tokens(lengths: np.ndarray, plan: BatchPlan, total_steps: int) -> int:
    """Tokens of the largest micro-batch of a run's `total_steps` optimizer steps (every rank's, resumed or not), from
    the rows' `lengths`: the plan fixes which rows each micro-batch reads."""
    largest = 0
    for epoch in range(math.ceil(total_steps / plan.steps_per_epoch)):
        steps = min(plan.steps_per_epoch, total_steps - epoch * plan.steps_per_epoch)
        order = np.asarray(plan.epoch_order(epoch)[: steps * plan.rows_per_step])
        largest = max(largest, int(lengths[order].reshape(-1, plan.rows_per_micro).sum(axis=1).max()))
    return largest


def join_budget(sizes: np.ndarray | None, plan: BatchPlan, total_steps: int, joins: bool) -> int | None:
    """The tokens a step's samples join up to across its micro-batches where the run `joins` them
    (TrainingConfig.joins_steps, on padding-free rows), from every row's token count `sizes` (`rows.lengths`): the
    run's largest micro-batch; None where they stay as the plan has them, and where FTW_JOIN_STEPS=0
    (bench/gpu_train.py's ftw-unjoined arm measures the joining against it)."""
    if sizes is None or not joins or os.environ.get(JOIN_ENV) == "0":
        return None
    return largest_micro_tokens(sizes, plan, total_steps)


def layout_name(packed: bool, flatten: bool, join_tokens: int | None) -> str:
    """How a run lays its rows out, for its log."""
    if packed:
        return "packed"
    if join_tokens:
        return f"unpacked, a step's samples joined into rows of at most {join_tokens:,} tokens"
    return "unpacked, each micro-batch one row" if flatten else "unpacked"


def runs_within(sizes: Sequence[int], budget: int) -> list[range]:
    """The indices of `sizes`, in their order, in as few consecutive runs as keep each within `budget` (a run closes
    when the next would not fit: no cut into consecutive runs has fewer; one larger than `budget` runs alone)."""
    runs: list[range] = []
    start, size = 0, 0
    for i, n in enumerate(sizes):
        if i > start and size + n > budget:
            runs.append(range(start, i))
            start, size = i, 0
        size += n
    return runs + [range(start, len(sizes))] if len(sizes) else runs


def joined(rows: list[dict], budget: int, passes: int | None = None) -> list[list[dict]]:
    """A step's samples, in their order, in as few consecutive runs as keep each within `budget` tokens, or in
    `passes` runs (`split_runs`) where several ranks must run as many passes as the rank that needs most. The trainer's
    loss sums each target token's loss over the step's count, so the runs give the micro-batches' gradient."""
    sizes = [len(row["input_ids"]) for row in rows]
    runs = runs_within(sizes, budget)
    return [rows[run.start : run.stop] for run in (split_runs(runs, sizes, passes) if passes else runs)]


def split_runs(runs: list[range], sizes: Sequence[int], passes: int) -> list[range]:
    """`runs` cut until there are `passes` of them (at most one a sample): each cut halves, by tokens, the run of most
    tokens among those of two samples or more. A cut only takes tokens from a run, so each stays within its budget,
    and the samples keep their order."""
    runs = list(runs)
    while len(runs) < passes:
        i = max((i for i, run in enumerate(runs) if len(run) > 1), key=lambda i: sum(sizes[j] for j in runs[i]))
        run = runs[i]
        before = list(itertools.accumulate(sizes[j] for j in run))  # tokens up to and with each sample
        cut = run.start + 1 + min(range(len(run) - 1), key=lambda k: abs(2 * before[k] - before[-1]))
        runs[i : i + 1] = [range(run.start, cut), range(cut, run.stop)]
    return runs


def ranks_passes(sizes: np.ndarray, plan: BatchPlan, step: int, order: list[int] | None, budget: int) -> int:
    """The most passes any rank's share of step `step` joins into (`runs_within`), from every row's token count
    `sizes`: every rank runs that many, since DDP's buffers and FSDP's parameters are gathered at every forward, and
    a rank with a pass fewer than another would leave its collective unpaired."""
    return max(
        len(runs_within([int(sizes[i]) for micro in plan.micro_batches(step, rank, order) for i in micro], budget))
        for rank in range(plan.world_size)
    )


def padding_free(cfg: TrainingConfig, packed: bool, kernels: list[str]) -> bool:
    """Whether an unpacked run's micro-batches are flattened: each one's samples joined end to end into one packed
    row (TrainingConfig.joins_samples says which runs may). It takes the varlen attention, which splits the row at the
    samples' position-id restarts at their own cost (Σ nᵢ², where transformers' mask for a packed row costs
    (Σ nᵢ)²)."""
    return cfg.joins_samples() and not packed and "varlen_attention" in kernels


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (every token of a packed row counts, as the cache counts them)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


ROW_KEYS = ("input_ids", "labels", "position_ids", "desirable", "answer_bytes")  # the list columns a batch reads


class Rows:
    """A prepared split's rows (a `datasets.Dataset`) as numpy views of its Arrow buffers: each column's values and
    row offsets, chunk by chunk, so a row is a slice of memory-mapped values, not a copy. Why not
    `Dataset.with_format("numpy")[indices]`: its formatting spends ~0.5 ms of Python on a step of 8 rows, ~9× this
    (bench/prefetch_cost.py), on the thread that launches the steps."""

    def __init__(self, ds):
        ds = ds.flatten_indices() if ds._indices is not None else ds  # a prepared split has no indices mapping
        table = ds.data.table
        self.num_rows = table.num_rows
        self.columns = {}  # key: (first row of each chunk, [(values, offsets) of each chunk])
        for key in (k for k in ROW_KEYS if k in table.column_names):
            chunks = table.column(key).chunks
            firsts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
            self.columns[key] = (
                firsts,
                [(c.values.to_numpy(zero_copy_only=False), c.offsets.to_numpy()) for c in chunks],
            )

    def __len__(self) -> int:
        return self.num_rows

    def row(self, index: int) -> dict[str, np.ndarray]:
        out = {}
        for key, (firsts, chunks) in self.columns.items():
            chunk = int(np.searchsorted(firsts, index, side="right")) - 1
            values, offsets = chunks[chunk]
            at = index - firsts[chunk]
            out[key] = values[offsets[at] : offsets[at + 1]]
        return out

    def take(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
        return [self.row(i) for i in indices]


@dataclass
class StepInput:
    """One rank's micro-batches of optimizer step `step` (host tensors) and their counts."""

    step: int
    micro: list[dict[str, torch.Tensor]]
    tokens: int  # real tokens, on this rank
    targets: int  # tokens that carry a loss, on this rank

    def staged(self, device: torch.device) -> StepInput:
        """On `device`: pinned, then copied without blocking, on the stream the steps run on, ahead of the step that
        reads them."""
        micro = [to_device({k: pin(v) for k, v in b.items()}, device) for b in self.micro]
        return StepInput(self.step, micro, self.tokens, self.targets)


def pin(value):
    """A tensor in pinned memory (non-blocking copies); anything else (a varlen max length) as is."""
    return value.pin_memory() if isinstance(value, torch.Tensor) else value


def to_device(batch: dict, device: torch.device) -> dict:
    """A micro-batch on `device`: tensors copied without blocking the host, plain values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def read_step(
    rows: Rows,
    plan: BatchPlan,
    step: int,
    rank: int,
    pad_id: int,
    packed: bool,
    order: list[int] | None = None,
    varlen: bool = False,
    count: Callable[[dict[str, torch.Tensor]], int] = target_tokens,
    pad_to: int | None = None,
    target_rows: bool = False,
    flatten: bool = False,
    join_tokens: int | None = None,
    sizes: np.ndarray | None = None,
) -> StepInput:
    """Step `step`'s micro-batches for `rank`, from a split's `Rows`;
    `varlen`: with the varlen attention kernel's segment boundaries, computed here on the host;
    `count`: the items the loss averages over (worker/train/objective.py); `pad_to`, `flatten`: see `collate`;
    `target_rows`: with the rows of each micro-batch that carry a loss, for the fused loss head;
    `join_tokens` (with `flatten`): the step's samples regrouped into runs of at most that many tokens (`joined`), as
    many on every rank of several (`ranks_passes`, from every row's token count, `sizes`)."""
    micros = [rows.take(m) for m in plan.micro_batches(step, rank, order)]
    if join_tokens:
        passes = ranks_passes(sizes, plan, step, order, join_tokens) if plan.world_size > 1 else None
        micros = joined([row for micro_rows in micros for row in micro_rows], join_tokens, passes)
    micro = [collate(r, pad_id, packed, pad_to, flatten) for r in micros]
    step_input = StepInput(step, micro, sum(real_tokens(b) for b in micro), sum(count(b) for b in micro))
    for b in micro:
        b.update(host_inputs(b, varlen, target_rows))
    return step_input


def host_inputs(batch: dict[str, torch.Tensor], varlen: bool, target_rows: bool) -> dict:
    """What the kernels take from a micro-batch's CPU tensors instead of reading the device back: the varlen
    attention's segment boundaries, the fused loss head's target rows."""
    out: dict = {}
    if varlen:
        from ftw_kernels.attention import host_segments

        out.update(host_segments(batch["position_ids"], batch.get("attention_mask")))
    if target_rows:
        from ftw_kernels.cross_entropy import target_rows as rows_of

        rows = rows_of(batch["labels"], IGNORE)
        if rows.numel() <= (1 - GATHER_MIN_SKIPPED) * batch["labels"].numel():
            out["target_rows"] = rows
    return out


class StepBatches:
    """The micro-batches of steps `steps`, in order: `get(step)` reads and collates that step's, and on CUDA pins them
    and queues their copies on the stream the steps run on (`StepInput.staged`); an error reading a step is raised
    there. The loop's own thread reads them: it queues steps up to STEPS_AHEAD ahead of the device
    (worker/train/step_queue.py), so the device does not wait for a read. Not a background thread: where the host
    sets a step's pace (short steps), a second Python thread costs the loop more in handing the interpreter's lock
    back and forth than the reading itself (bench/prefetch_cost.py)."""

    def __init__(
        self,
        ds,
        plan: BatchPlan,
        rank: int,
        pad_id: int,
        packed: bool,
        steps: range,
        device: torch.device,
        varlen: bool = False,
        count: Callable[[dict[str, torch.Tensor]], int] = target_tokens,
        pad_to: int | None = None,
        target_rows: bool = False,
        flatten: bool = False,
        join_tokens: int | None = None,
        sizes: np.ndarray | None = None,
    ):
        rows = Rows(ds)

        def read(step: int, order: list[int] | None) -> StepInput:
            return read_step(
                rows, plan, step, rank, pad_id, packed, order, varlen, count, pad_to, target_rows, flatten,
                join_tokens, sizes,
            )  # fmt: skip

        self.batches = self._batches(read, plan, steps, device)

    @staticmethod
    def _batches(
        read: Callable[[int, list[int] | None], StepInput], plan: BatchPlan, steps: range, device: torch.device
    ) -> Iterator[StepInput]:
        epoch, order = None, None
        for step in steps:
            if step // plan.steps_per_epoch != epoch:
                epoch = step // plan.steps_per_epoch
                order = plan.epoch_order(epoch)
            batch = read(step, order)
            yield batch.staged(device) if device.type == "cuda" else batch

    def get(self, step: int) -> StepInput:
        batch = next(self.batches, None)
        if batch is None:
            raise RuntimeError(f"step {step} asked for after the last planned step")
        if batch.step != step:
            raise RuntimeError(f"step {step} asked for where step {batch.step} was due")
        return batch

    def close(self) -> None:
        self.batches.close()

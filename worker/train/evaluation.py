"""The eval split's loss and the objective's metrics, sharded over the ranks."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from schemas.config import TrainingConfig
from worker.data.cache import PreparedData
from worker.data.rows import lengths
from worker.train import distributed as dist_
from worker.train.batches import Rows, collate, host_inputs, runs_within, to_device
from worker.train.objective import Objective


@torch.no_grad()
def evaluate(
    engine: torch.nn.Module,
    objective: Objective,
    data: PreparedData,
    pad_id: int,
    topo: dist_.Topology,
    autocast: Callable[[], AbstractContextManager],
    chunks: list[list[int]],
    flatten: bool = False,
    varlen: bool = False,
) -> tuple[float, dict[str, float]]:
    """(mean loss per item: a target token, or a pair for the DPO family; the objective's metrics) over the
    whole eval split, in `chunks` (`eval_chunks`: the run's, fixed once). Every rank runs the same number of forwards
    (FSDP needs it): a rank short of chunks repeats the first one and does not count it. Its batches are laid out as
    the training steps' are: `flatten` (padding-free), `varlen` (the boundaries from the host) and the objective's
    target rows."""
    rows = Rows(data.eval)
    per_rank = math.ceil(len(chunks) / topo.world_size)
    mine = [
        (chunks[j], True) if j < len(chunks) else (chunks[0], False)
        for j in range(topo.rank, per_rank * topo.world_size, topo.world_size)
    ]
    sums = torch.zeros(1 + len(objective.metric_names), dtype=torch.float64, device=topo.device)
    count, as_sum = 0, torch.ones((), device=topo.device)
    engine.eval()
    for indices, real in mine:
        batch = collate(rows.take(indices), pad_id, data.packed, flatten=flatten)
        batch.update(host_inputs(batch, varlen, objective.target_rows))
        with autocast():
            loss, metric_sums = objective.loss(engine, to_device(batch, topo.device), as_sum)
        if real:
            sums += torch.cat([loss.double().reshape(1), metric_sums])
            count += objective.count(batch)
    engine.train()
    loss_sum, count, *metric_sums = dist_.all_sum([float(sums[0]), count, *sums[1:].tolist()], topo)
    return loss_sum / max(count, 1), objective.metrics(metric_sums, count)


def eval_chunks(data: PreparedData, cfg: TrainingConfig, flatten: bool, join_tokens: int | None) -> list[list[int]]:
    """The eval split's batches (row indices), the same at every evaluation of a run: `eval_batch_size` samples each
    (else micro_batch_size; one packed row), padding-free ones joined (`joined_chunks`)."""
    n = len(data.eval)
    per_micro = 1 if data.packed else (cfg.eval_batch_size or cfg.batch_shape()[0])
    chunks = [list(range(i, min(i + per_micro, n))) for i in range(0, n, per_micro)]
    if flatten and chunks and not cfg.output_router_logits:
        return joined_chunks(lengths(data.eval.with_format("arrow")[:]), chunks, join_tokens)
    return chunks


def joined_chunks(sizes, chunks: list[list[int]], join_tokens: int | None) -> list[list[int]]:
    """Padding-free eval batches (the supervised loss, a sum over target tokens; no router aux loss, which a forward
    adds once) joined in order up to the largest forward the run already makes, the eval's largest batch or the
    training's joined pass (`join_tokens`): fewer forwards, each of which a host-bound short batch pays in launches,
    and none larger than one that ran."""
    budget = max(max(int(sizes[chunk].sum()) for chunk in chunks), join_tokens or 0)
    return [list(run) for run in runs_within(sizes, budget)]

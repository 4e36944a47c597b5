"""What one micro-batch's loss is: the contract between the training loop and a training method.

    objective = build_objective(cfg, model, tokenizer)
    n = objective.count(batch)                       # on the host, as the batch is read
    loss, sums = objective.loss(engine, batch, n_items)   # loss already divided by the global n_items
    objective.metrics(summed_sums, n_items)          # → extra progress metrics of a step
    objective.close()                                # at the end of training: e.g. GRPO's vLLM engine stops

`count` is what the loss is averaged over: target tokens for SFT, pairs for the DPO family,
completions for KTO, prompts for GRPO and EBFT structured, documents for EBFT strided; the trainer
sums it over micro-batches and ranks (`n_items`), so a step's loss is the mean over the global batch
whatever the split. `sums` is a fixed-length vector the trainer adds up across micro-batches and
ranks and hands to `metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from schemas.config import TrainingConfig
from worker.train.batches import target_tokens


class Objective(Protocol):
    metric_names: tuple[str, ...]
    target_rows: bool  # its batches carry the fused loss head's target rows (batches.host_inputs)

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(
        self, engine, batch: dict[str, torch.Tensor], n_items: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def metrics(self, sums: list[float], n_items: float) -> dict[str, float]: ...

    def close(self) -> None: ...


class SupervisedObjective:
    """Next-token cross-entropy over the target tokens (transformers' loss, or kernels' fused one).
    With the MoE router's aux loss on (`router_loss`), its value is summed per micro-batch and
    logged as `aux_loss`, the mean over the step's micro-batches on every rank (its coef × it is
    already inside the loss: worker/train/moe.py). With the fused loss (`fused`), the loss head takes only the
    target tokens' rows, which the batch's reader lists on the host."""

    def __init__(self, router_loss: bool = False, fused: bool = False):
        self.router_loss, self.target_rows = router_loss, fused
        self.metric_names: tuple[str, ...] = ("aux_loss_sum", "micro_batches") if router_loss else ()

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return target_tokens(batch)

    def loss(
        self, engine, batch: dict[str, torch.Tensor], n_items: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = engine(**batch, num_items_in_batch=n_items)
        sums = torch.zeros(len(self.metric_names), dtype=torch.float64, device=out.loss.device)
        if self.router_loss and out.aux_loss is not None:
            sums[0], sums[1] = out.aux_loss.detach().double(), 1.0
        return out.loss, sums

    def metrics(self, sums: list[float], n_items: float) -> dict[str, float]:
        return {"aux_loss": sums[0] / sums[1]} if self.router_loss and sums[1] else {}

    def close(self) -> None:
        """Nothing to release."""


def build_objective(
    cfg: TrainingConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    router_loss: bool = False,
    run_dir: Path | None = None,
    kernels: Sequence[str] = (),
) -> Objective:
    """The run's objective; GRPO's starts its generator here (vLLM: a child process, folders under `run_dir`);
    `kernels`: the kernel patches applied (the DPO family and GRPO take per-token losses from the fused loss)."""
    method = cfg.rl_method()
    fused = "fused_linear_cross_entropy" in kernels
    if method is None:
        return SupervisedObjective(router_loss, fused)
    if method == "grpo":
        from worker.train.grpo import GrpoObjective

        return GrpoObjective(cfg, model, tokenizer, run_dir, fused_token_losses=fused)
    if method == "ebft" and cfg.ebft is not None and cfg.ebft.mode == "strided":
        from worker.train.ebft_strided import StridedEbftObjective

        return StridedEbftObjective(cfg, model, tokenizer)
    if method == "ebft":
        from worker.train.ebft_structured import StructuredEbftObjective

        return StructuredEbftObjective(cfg, model, tokenizer, run_dir)
    from worker.train.preference import PreferenceObjective

    return PreferenceObjective(cfg, model, fused_token_losses=fused)

"""The trainer loop's objective for rl: ebft, mode structured (one item = one prompt with its ground truth).

Per micro-batch of rows (prompt masked, then the ground-truth answer: worker/data/ebft_rows.py):
1. generate: trl.num_generations completions per prompt from `self.generator` (worker/train/generation.py,
   the backends GRPO uses: the policy's own `generate`, or with trl.use_vllm the vLLM engine beside the
   trainer, the adapter synced into it every trl.vllm_sync_interval optimizer steps). With
   ebft.adaptive_max_tokens, at most gt_length_multiplier × the longest ground truth of the micro-batch is
   generated (never more than trl.max_completion_length, which sizes the engine's context).
2. features of prompt + completion and of prompt + ground truth from the frozen model (the adapter
   disabled; a frozen copy for full fine-tuning), pooled by embed_method over the real tokens
   (completion_mean: the completion's only), optionally whitened per prompt.
3. rewards (eq. 7), GRPO's group advantages (trl.scale_rewards), GRPO's clipped policy loss with KL
   to the reference (trl.beta), plus ce_coef × the cross-entropy of the ground truth.
In evaluation the loss is that cross-entropy, and the CFM is logged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from schemas.config import TrainingConfig
from schemas.rl import EbftConfig, TrlConfig
from worker.train import ebft
from worker.train.batches import IGNORE
from worker.train.generation import build_generator
from worker.train.grpo import Rollout, completion_logps, group_advantages, policy_loss, rollout_of
from worker.train.sampling import Sampling, VllmOptions


def right_padded(rollout: Rollout, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, completion) of each prompt + completion, right-padded (Rollouts are left-padded)."""
    keep = rollout.attention_mask.bool()
    lengths = keep.sum(1)
    width = int(lengths.max())
    ids = torch.full((keep.shape[0], width), pad_id, dtype=rollout.input_ids.dtype, device=keep.device)
    completion = torch.zeros((keep.shape[0], width), dtype=torch.bool, device=keep.device)
    columns = torch.arange(keep.shape[1], device=keep.device)
    for i in range(keep.shape[0]):
        n = int(lengths[i])
        ids[i, :n] = rollout.input_ids[i][keep[i]]
        completion[i, :n] = columns[keep[i]] >= rollout.prompt_width
    mask = torch.arange(width, device=keep.device)[None] < lengths[:, None]
    return ids, mask, completion


class StructuredEbftObjective:
    target_rows = False  # its losses are its own, not the fused mean loss over target rows
    metric_names = (
        *ebft.REWARD_METRICS,
        "ebft/ce_loss",
        "completion_length",
        "kl",
    )
    plotted = ("ebft/cfm_loss",)

    def __init__(self, cfg: TrainingConfig, model: Any, tokenizer: Any, run_dir: Path | None = None):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.ebft, self.trl = cfg.ebft or EbftConfig(), cfg.trl or TrlConfig()
        self.beta = cfg.rl_beta_value()
        self.diversity = self.ebft.diversity(self.trl)
        self.layers = ebft.layer_indices(self.ebft.feature_layers, model.config.num_hidden_layers)
        self.frozen = None if hasattr(model, "disable_adapter") else copy.deepcopy(model).eval().requires_grad_(False)
        self.sampling = Sampling.from_trl(self.trl, tokenizer.eos_token_id)
        self.micro_per_step = cfg.batch_shape()[1]  # micro-batches per optimizer step (one process)
        self.micro_seen = 0  # training micro-batches so far in this process
        vllm = VllmOptions.from_trl(self.trl) if self.trl.use_vllm else None
        self.generator = build_generator(model, tokenizer, vllm, cfg, run_dir)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """Pooled features of right-padded sequences from the frozen model."""
        model = self.frozen if self.frozen is not None else self.model
        disabled = self.model.disable_adapter() if self.frozen is None else nullcontext()
        was_training = model.training
        model.eval()
        try:
            with disabled:
                out = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False)
        finally:
            model.train(was_training)
        return ebft.pool(ebft.features(out.hidden_states, self.layers), self.ebft.embed_method, mask, completion)

    def ground_truth_ce(self, engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the ground-truth tokens under the policy, per prompt (B,)."""
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        trained = labels != IGNORE
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
        return -(logp * trained).sum(1) / trained.sum(1).clamp(min=1)

    def loss(
        self, engine: Any, batch: dict[str, torch.Tensor], n_items: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        g, pad = self.trl.num_generations, self.tokenizer.pad_token_id or 0
        trained = labels != IGNORE
        prompt_len = torch.where(trained.any(1), trained.int().argmax(1), mask.sum(1))
        prompt_mask = (torch.arange(ids.shape[1], device=ids.device)[None] < prompt_len[:, None]).long()
        trl, sampling = self.trl, self.sampling
        if self.ebft.adaptive_max_tokens:
            longest = int((mask.sum(1) - prompt_len).max())
            limit = min(trl.max_completion_length, max(1, math.ceil(longest * self.ebft.gt_length_multiplier)))
            sampling = dataclasses.replace(sampling, max_tokens=limit)
        training = self.model.training
        self.generator.sync(self.micro_seen // self.micro_per_step, force=not training)
        self.micro_seen += int(training)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, prompt_mask)]
        completions = self.generator.completions(prompts, sampling)
        rollout = rollout_of(
            ids * prompt_mask, prompt_mask, completions, g, sampling.stop_id, pad, trl.mask_truncated_completions
        )
        gen = self.embed(*right_padded(rollout, pad)).view(ids.shape[0], g, -1)
        gt = self.embed(ids, mask.bool(), trained)
        if self.ebft.use_whitening:
            gen, gt = ebft.whiten(gen, gt)
        scored = ebft.rewards(gen, gt, self.ebft.alignment_coef, self.diversity)
        ce = self.ground_truth_ce(engine, batch)
        kl = torch.zeros((), device=ids.device)
        if self.model.training:
            advantages = group_advantages(scored.reward.reshape(-1), g, trl.scale_rewards)
            ref = None
            if self.beta > 0:
                disabled = self.model.disable_adapter() if self.frozen is None else nullcontext()
                with torch.no_grad(), disabled:
                    ref = completion_logps(self.frozen or engine, rollout)
            logp = completion_logps(engine, rollout)
            rl, kl = policy_loss(logp, logp.detach(), ref, advantages, rollout.completion_mask, trl, self.beta)
            loss = rl + self.ebft.ce_coef * ce.mean()
        else:
            loss = ce.mean()
        prompts = float(ids.shape[0])
        stats = [
            *scored.means(),
            ce.detach().mean(),
            rollout.completion_mask.sum(1).float().mean(),
            kl,
        ]
        sums = torch.stack([s.detach().double().to(ids.device) for s in stats]) * prompts
        return loss * prompts / n_items, sums

    def metrics(self, sums: list[float], n_items: float) -> dict[str, float]:
        return {name: value / max(n_items, 1) for name, value in zip(self.metric_names, sums)}

    def close(self) -> None:
        self.generator.close()

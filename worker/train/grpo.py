"""GRPO's core for the trainer loop: generate, reward, group-normalise, clipped objective with KL.

Per micro-batch of prompts (worker/train/objective.py's contract; a prompt is one item):
1. `generate`: num_generations completions per prompt from the generator (worker/train/generation.py:
   transformers' `generate` with the live adapter, or vLLM with the adapter synced every
   `vllm_sync_interval` steps; temperature / top_p / top_k / min_p / repetition_penalty from `trl:`),
   cut at the first EOS (`mask_truncated_completions` drops completions that never end from the loss).
2. `score`: the reward functions (worker/train/rewards.py: built-ins, or the user's where the operator
   allows it), weighted by `reward_weights` (a None from a user's function counts 0, as in TRL).
3. `advantages`: per group of one prompt's completions, A = r − mean (÷ (std + 1e-4) when
   `scale_rewards`).
4. `loss`: per completion token, ρ = π/π_old, −min(ρA, clip(ρ, 1−ε, 1+ε_high)A) + β·KL(π‖π_ref)
   with the k3 estimator exp(ref − logp) − (ref − logp) − 1 and π_ref = the adapter disabled.
   With one optimisation pass per generation batch (num_iterations 1), π_old is π detached: ρ = 1
   in value, so the clip never bites, as in TRL. Tokens aggregate per `loss_type`: grpo (mean per
   completion, then over completions), bnpo (mean over all completion tokens of the micro-batch),
   dr_grpo (sum ÷ (completions × max_completion_length)).

These pieces are functions of tensors (generation and scoring apart from the loss) so EBFT can reuse
the generation, the advantages and the policy loss with its own rewards.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.config import TrainingConfig
from schemas.rl import TrlConfig
from worker.train.batches import IGNORE
from worker.train.generation import build_generator
from worker.train.rewards import Rewards
from worker.train.sampling import Sampling, VllmOptions


@dataclass(frozen=True)
class Rollout:
    """One micro-batch's prompts and completions as one right-padded batch (B·G rows)."""

    input_ids: torch.Tensor  # prompt + completion, right-padded
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # 1 on completion tokens that count (up to and with the first EOS)
    prompt_width: int  # completions start at this column


def left_aligned(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts (as collate makes them) → left-padded, as generate wants them."""
    lengths = attention_mask.sum(1)
    width = int(lengths.max())
    ids = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n :] = input_ids[i, :n]
        mask[i, width - n :] = 1
    return ids, mask


def rollout_of(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completions: list[list[int]],
    group: int,
    eos_id: int,
    pad_id: int,
    mask_truncated: bool,
) -> Rollout:
    """The micro-batch's prompts (right-padded, as collate makes them) and their completions (`group` per prompt,
    prompt-major, each cut after its first EOS) as one batch: prompts left-padded, completions right-padded."""
    prompts, prompt_mask = left_aligned(input_ids, attention_mask, pad_id)
    width = max(1, max(len(c) for c in completions))
    tail = torch.full((len(completions), width), pad_id, dtype=input_ids.dtype)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        tail[i, : len(c)] = torch.tensor(c, dtype=input_ids.dtype)
        ended = bool(c) and c[-1] == eos_id
        completion_mask[i, : len(c)] = 0 if mask_truncated and not ended else 1
    tail, completion_mask = tail.to(input_ids.device), completion_mask.to(input_ids.device)
    ids = torch.cat([prompts.repeat_interleave(group, 0), tail], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(group, 0), completion_mask], 1)
    return Rollout(ids, mask, completion_mask, prompts.shape[1])


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """A = r − mean over each prompt's `group` completions (÷ (std + 1e-4) when `scale`)."""
    r = rewards.view(-1, group)
    centred = r - r.mean(1, keepdim=True)
    if scale:
        centred = centred / (r.std(1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def completion_logps(model, rollout: Rollout, fused: bool = False) -> torch.Tensor:
    """Per-token log-probs of the completion tokens (B·G × completion width); positions follow the left padding.
    `fused`: the model's forward is ftw_kernels' fused loss (kernels applied "fused_linear_cross_entropy"),
    asked for per-token losses with the completion tokens as labels: no B·G × width × vocab logits."""
    positions = (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)
    inputs = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "position_ids": positions}
    targets = rollout.input_ids[:, rollout.prompt_width :]
    if fused:
        labels = torch.full_like(rollout.input_ids, IGNORE)
        labels[:, rollout.prompt_width :] = torch.where(rollout.completion_mask.bool(), targets, IGNORE)
        losses = model(**inputs, labels=labels, token_losses=True, use_cache=False).loss
        # loss[t] is token t's prediction of label t+1: the completion's columns shifted left by one
        return -losses.view(rollout.input_ids.shape)[:, rollout.prompt_width - 1 : -1]
    logits = model(**inputs, use_cache=False).logits[:, rollout.prompt_width - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(2, targets[..., None])[..., 0]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    trl: TrlConfig,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of the micro-batch per trl.loss_type, mean KL per completion token). `advantages`: one per
    completion (GRPO), or one per completion token (EBFT's strided blocks)."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - trl.epsilon, 1 + (trl.epsilon_high or trl.epsilon))
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    per_token = -torch.min(ratio * adv, clipped * adv)
    mask = mask.float()
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if trl.loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif trl.loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (mask.shape[0] * trl.max_completion_length)
    return loss, ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()


class GrpoObjective:
    """The trainer loop's objective for rl: grpo (one item = one prompt of the micro-batch)."""

    target_rows = False  # its losses are its own, not the fused mean loss over target rows

    def __init__(
        self,
        cfg: TrainingConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        run_dir: Path | None = None,
        fused_token_losses: bool = False,
    ):
        """`fused_token_losses`: log-probs from the kernels' fused loss (`completion_logps`)."""
        self.cfg, self.model, self.tokenizer, self.trl = cfg, model, tokenizer, cfg.trl or TrlConfig()
        self.fused_token_losses = fused_token_losses
        self.beta = cfg.rl_beta_value()
        self.rewards = Rewards(cfg, os.environ)  # the user's functions load (and fail) here, before any step
        self.funcs = self.rewards.names
        self.weights = torch.tensor(self.trl.reward_weights or [1.0] * len(self.funcs), dtype=torch.float32)
        self.metric_names = ("reward", "reward_std", "completion_length", "kl", *(f"rewards/{f}" for f in self.funcs))
        self.sampling = Sampling.from_trl(self.trl, tokenizer.eos_token_id)
        self.micro_per_step = cfg.batch_shape()[1]  # one process (use_vllm refuses more): micro-batches per step
        self.micro_seen = 0  # training micro-batches so far in this process
        vllm = VllmOptions.from_trl(self.trl) if self.trl.use_vllm else None
        self.generator = build_generator(model, tokenizer, vllm, cfg, run_dir)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def score(
        self, batch: dict[str, torch.Tensor], completions: list[list[int]]
    ) -> tuple[torch.Tensor, dict[str, list[float]]]:
        tok, g = self.tokenizer, self.trl.num_generations
        rows = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        prompts = [p for p in tok.batch_decode(rows, skip_special_tokens=True) for _ in range(g)]
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        answers = [a for a in decode_answers(batch["answer_bytes"]) for _ in range(g)]
        per_func = self.rewards(prompts, texts, completions, answers)
        table = torch.tensor([per_func[f] for f in self.funcs], dtype=torch.float32)  # funcs × completions
        return (self.weights[:, None] * table).nansum(0), per_func

    def generate(self, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        """num_generations completions per prompt from the generator, synced to this optimizer step first."""
        training = self.model.training
        self.generator.sync(self.micro_seen // self.micro_per_step, force=not training)
        self.micro_seen += int(training)
        rows = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        return self.generator.completions(rows, self.sampling)

    def loss(
        self, engine, batch: dict[str, torch.Tensor], n_items: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        completions = self.generate(batch)
        g = self.trl.num_generations
        rollout = rollout_of(
            batch["input_ids"],
            batch["attention_mask"],
            completions,
            g,
            self.sampling.stop_id,
            pad,
            self.trl.mask_truncated_completions,
        )
        total, per_func = self.score(batch, completions)
        advantages = group_advantages(total, g, self.trl.scale_rewards).to(rollout.input_ids.device)
        ref = None
        if self.beta > 0:
            disabled = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()  # type: ignore[operator]
            with torch.no_grad(), disabled:
                ref = completion_logps(engine, rollout, self.fused_token_losses)
        logp = completion_logps(engine, rollout, self.fused_token_losses)
        loss, kl = policy_loss(logp, logp.detach(), ref, advantages, rollout.completion_mask, self.trl, self.beta)
        prompts = float(batch["input_ids"].shape[0])
        groups = total.view(-1, g)
        stats = [
            groups.mean(),
            groups.std(1).mean(),
            torch.tensor([len(c) for c in completions], dtype=torch.float32).mean(),
            kl.cpu(),
            *(torch.tensor(per_func[f]).nanmean() for f in self.funcs),
        ]
        sums = torch.stack([torch.as_tensor(s).detach().double().cpu() for s in stats]) * prompts
        return loss * prompts / n_items, sums.to(loss.device)

    def metrics(self, sums: list[float], n_items: float) -> dict[str, float]:
        return {name: value / max(n_items, 1) for name, value in zip(self.metric_names, sums)}

    def close(self) -> None:
        self.generator.close()


def decode_answers(answer_bytes: torch.Tensor) -> list[str]:
    """The rows' answers, carried as UTF-8 bytes padded with -1 (a batch holds tensors only)."""
    return [bytes(b for b in row.tolist() if b >= 0).decode("utf-8") for row in answer_bytes]

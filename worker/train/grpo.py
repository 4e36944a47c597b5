"""GRPO's core for the trainer loop: generate, reward, group-normalise, clipped objective with KL.

Per micro-batch of prompts (worker/train/objective.py's contract; a prompt is one item):
1. `generate`: num_generations completions per prompt with transformers' `generate` (adapter on,
   eval mode, no grad; temperature / top_p / top_k / min_p / repetition_penalty from `trl:`),
   cut at the first EOS (`mask_truncated_completions` drops completions that never end).
2. `score`: the built-in rewards (worker/train/rewards.py), weighted by `reward_weights`.
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

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from schemas.config import TrainingConfig
from schemas.rl import TrlConfig
from worker.train.rewards import rewards as reward_values


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


@torch.no_grad()
def generate(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trl: TrlConfig, eos_id: int, pad_id: int
) -> Rollout:
    prompts, prompt_mask = left_aligned(input_ids, attention_mask, pad_id)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=trl.temperature,
            top_p=trl.top_p,
            top_k=trl.top_k or 0,
            min_p=trl.min_p,
            repetition_penalty=trl.repetition_penalty,
            max_new_tokens=trl.max_completion_length,
            num_return_sequences=trl.num_generations,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    finally:
        model.train(was_training)
    width = prompts.shape[1]
    completions = out[:, width:]
    is_eos = completions == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completions.shape[1])
    completion_mask = (torch.arange(completions.shape[1], device=out.device)[None] <= first_eos[:, None]).long()
    if trl.mask_truncated_completions:
        completion_mask *= is_eos.any(1, keepdim=True).long()
    prompt_mask = prompt_mask.repeat_interleave(trl.num_generations, 0)
    return Rollout(out, torch.cat([prompt_mask, completion_mask], 1), completion_mask, width)


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """A = r − mean over each prompt's `group` completions (÷ (std + 1e-4) when `scale`)."""
    r = rewards.view(-1, group)
    centred = r - r.mean(1, keepdim=True)
    if scale:
        centred = centred / (r.std(1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def completion_logps(model, rollout: Rollout) -> torch.Tensor:
    """Per-token log-probs of the completion tokens (B·G × completion width); positions follow the left padding."""
    positions = (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions, use_cache=False
    ).logits
    logits = logits[:, rollout.prompt_width - 1 : -1].float()
    targets = rollout.input_ids[:, rollout.prompt_width :]
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

    def __init__(self, cfg: TrainingConfig, model: torch.nn.Module, tokenizer):
        self.cfg, self.model, self.tokenizer, self.trl = cfg, model, tokenizer, cfg.trl or TrlConfig()
        self.beta = cfg.rl_beta_value()
        self.funcs = list(self.trl.reward_funcs or [])
        self.weights = torch.tensor(self.trl.reward_weights or [1.0] * len(self.funcs), dtype=torch.float32)
        self.metric_names = ("reward", "reward_std", "completion_length", "kl", *(f"rewards/{f}" for f in self.funcs))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def score(self, rollout: Rollout, answers: list[str]) -> tuple[torch.Tensor, dict[str, list[float]]]:
        tok, g = self.tokenizer, self.trl.num_generations
        completions = rollout.input_ids[:, rollout.prompt_width :]
        texts = tok.batch_decode(
            [c[m.bool()].tolist() for c, m in zip(completions, rollout.completion_mask)], skip_special_tokens=True
        )
        lengths = rollout.completion_mask.sum(1).tolist()
        per_func = reward_values(self.cfg, texts, [a for a in answers for _ in range(g)], lengths)
        table = torch.tensor([per_func[f] for f in self.funcs], dtype=torch.float32)  # funcs × completions
        return (self.weights[:, None] * table).sum(0), per_func

    def loss(self, engine, batch: dict[str, torch.Tensor], n_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        answers = decode_answers(batch["answer_bytes"])
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id or 0
        rollout = generate(self.model, batch["input_ids"], batch["attention_mask"], self.trl, eos, pad)
        total, per_func = self.score(rollout, answers)
        advantages = group_advantages(total, self.trl.num_generations, self.trl.scale_rewards).to(
            rollout.input_ids.device
        )
        ref = None
        if self.beta > 0:
            disabled = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
            with torch.no_grad(), disabled:
                ref = completion_logps(engine, rollout)
        logp = completion_logps(engine, rollout)
        loss, kl = policy_loss(logp, logp.detach(), ref, advantages, rollout.completion_mask, self.trl, self.beta)
        prompts = float(batch["input_ids"].shape[0])
        groups = total.view(-1, self.trl.num_generations)
        stats = [
            groups.mean(),
            groups.std(1).mean(),
            rollout.completion_mask.sum(1).float().mean(),
            kl.cpu(),
            *(torch.tensor(per_func[f]).mean() for f in self.funcs),
        ]
        sums = torch.stack([torch.as_tensor(s).detach().double().cpu() for s in stats]) * prompts
        return loss * prompts / n_items, sums.to(loss.device)

    def metrics(self, sums: list[float], n_items: float) -> dict[str, float]:
        return {name: value / max(n_items, 1) for name, value in zip(self.metric_names, sums)}


def decode_answers(answer_bytes: torch.Tensor) -> list[str]:
    """The rows' answers, carried as UTF-8 bytes padded with -1 (tensors only cross the prefetch thread)."""
    return [bytes(b for b in row.tolist() if b >= 0).decode("utf-8") for row in answer_bytes]

"""EBFT's feature-matching rewards, as functions of tensors (both modes use them; the paper is
"Matching Features, Not Tokens: Energy-Based Fine-Tuning of Language Models", Jelassi et al. 2026).

- features: hidden states of the frozen model (the adapter disabled) at fractional depths
  `feature_layers` (0.0 the embeddings, 1.0 the last layer), each layer L2-normalised, then concatenated.
- pooling (`embed_method`) over a sequence's tokens: last_token, mean_pooling, completion_mean
  (completion tokens only), concat (the tokens at 1/4, 1/2 and 3/4 of the length).
- whitening (optional): W = U diag(1/σ) Uᵀ from the SVD of the n samples' embeddings (features ×
  samples), applied to the samples and to the ground truth; directions with σ ≤ 1e-5 σ_max dropped.
- reward (eq. 7): r_j = 2·a·cos(φ(ŷ_j), φ(y)) − 2·d/(n−1)·Σ_{j'≠j} φ(ŷ_j)·φ(ŷ_j').
- CFM (eq. 2), the quantity EBFT lowers: ‖mean_j φ(ŷ_j) − φ(y)‖².
- advantages over a prompt's n samples: rloo r_j − mean_{j'≠j} r_j', group_norm (r − mean)/(std + 1e-4)
  (GRPO's), reinforce r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.train.grpo import group_advantages

WHITEN_TOL = 1e-5
REWARD_METRICS = ("ebft/mean_reward", "ebft/alignment", "ebft/diversity", "ebft/cfm_loss")  # Rewards.means()


def layer_indices(fractions: list[float], num_layers: int) -> list[int]:
    """Indices into transformers' hidden_states tuple (0 = embeddings, num_layers = the last layer's output)."""
    return [int(f * num_layers) for f in fractions]


def features(hidden_states: tuple[torch.Tensor, ...], indices: list[int]) -> torch.Tensor:
    """(…, T, k·H): the chosen layers, each L2-normalised per token, concatenated (float32)."""
    return torch.cat([F.normalize(hidden_states[i].float(), dim=-1) for i in indices], dim=-1)


def pool(feats: torch.Tensor, method: str, mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """(…, T, D) → (…, D) (concat: 3·D). `mask`: the real tokens (…, T); `completion`: the generated
    or ground-truth ones (completion_mean's)."""
    mask = mask.bool().expand(feats.shape[:-1])
    completion = completion.bool().expand(feats.shape[:-1]) & mask
    if method == "last_token":
        last = mask.long().sum(-1).clamp(min=1) - 1
        return feats.gather(-2, last[..., None, None].expand(*last.shape, 1, feats.shape[-1]))[..., 0, :]
    if method in ("mean_pooling", "completion_mean"):
        keep = (mask if method == "mean_pooling" else completion).float()[..., None]
        return (feats * keep).sum(-2) / keep.sum(-2).clamp(min=1)
    length = mask.long().sum(-1)
    picks = [(length * q // 4).clamp(max=feats.shape[-2] - 1) for q in (1, 2, 3)]
    return torch.cat(
        [feats.gather(-2, p[..., None, None].expand(*p.shape, 1, feats.shape[-1]))[..., 0, :] for p in picks], -1
    )


def whiten(gen: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gen (…, n, D), gt (…, D) → both times W = U diag(1/σ) Uᵀ, U, σ from the SVD of genᵀ (per leading index)."""
    u, s, _ = torch.linalg.svd(gen.float().transpose(-1, -2), full_matrices=False)  # u (…, D, r), s (…, r)
    inv = torch.where(s > WHITEN_TOL * s.amax(-1, keepdim=True), 1.0 / (s + 1e-12), torch.zeros_like(s))
    w = (u * inv[..., None, :]) @ u.transpose(-1, -2)  # (…, D, D)
    return gen.float() @ w, (gt.float()[..., None, :] @ w)[..., 0, :]


@dataclass(frozen=True)
class Rewards:
    reward: torch.Tensor  # (…, n)
    alignment: torch.Tensor  # (…, n), 2·cos
    diversity: torch.Tensor  # (…, n), 2·mean dot with the other samples
    cfm: torch.Tensor  # (…,)

    def means(self) -> list[torch.Tensor]:
        """The batch means logged under REWARD_METRICS, in that order."""
        return [self.reward.mean(), self.alignment.mean(), self.diversity.mean(), self.cfm.mean()]


def rewards(gen: torch.Tensor, gt: torch.Tensor, alignment_coef: float, diversity_coef: float) -> Rewards:
    """gen (…, n, D) samples, gt (…, D) their ground truth → eq. 7 per sample, and the CFM per group."""
    n = gen.shape[-2]
    alignment = 2 * F.cosine_similarity(gen, gt[..., None, :].expand_as(gen), dim=-1)
    diversity = torch.zeros_like(alignment)
    if n > 1:
        dots = gen @ gen.transpose(-1, -2)
        diversity = 2 * (dots.sum(-1) - dots.diagonal(dim1=-2, dim2=-1)) / (n - 1)
    cfm = (gen.mean(-2) - gt).pow(2).sum(-1)
    return Rewards(alignment_coef * alignment - diversity_coef * diversity, alignment, diversity, cfm)


def advantages(reward: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per group of n samples along the last dim: rloo, group_norm or reinforce."""
    n = reward.shape[-1]
    if estimator == "rloo" and n > 1:
        return reward - (reward.sum(-1, keepdim=True) - reward) / (n - 1)
    if estimator == "group_norm" and n > 1:
        return group_advantages(reward.reshape(-1, n).reshape(-1), n, scale=True).view_as(reward)
    return reward

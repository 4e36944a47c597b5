"""The DPO family's losses on packed rows: DPO (sigmoid), IPO, ORPO, SimPO, KTO.

A prepared row holds whole sequences back to back, position_ids restarting at each (docs/contracts.md):
pairs as chosen, rejected, chosen, rejected...; kto completions with a `desirable` flag each. One
forward of the row gives every sequence's log-probability (attention split per sequence at the
position resets, as for packed SFT), so chosen and rejected share the forward without padding.

The reference model is the same model with the LoRA adapter disabled (peft's `disable_adapter()`),
run under no_grad on the same row right before the policy forward: on the fly, not precomputed.
Why, measured on CPU (`python bench/dpo.py --ref-share --shape tiny --mbs 2 --steps 3 --prompt 100
--answer 500`): the reference forward is 16% of a whole DPO step. Precomputing costs the same forward once per
pair before the first step — the same total in a one-epoch run, the share saved per further epoch — and needs
each row's identity carried into
the step and a whole pass over the data before any progress; on the fly keeps resume, eval and the
data contract as they are. `precompute_ref_log_probs` is accepted with a warning (no effect).

With ftw's kernels applied ("fused_linear_cross_entropy"), both forwards return each token's loss
from the last hidden states (kernels/ftw_kernels/cross_entropy.py's `fused_linear_token_losses`)
instead of the tokens × vocab logits (128k wide for Llama 3), which the plain path upcasts in chunks.

Formulas (per pair; l = summed log-prob of the answer tokens, ā = l / tokens, β = `rl_beta_value()`):
- dpo:   z = (lc − lr) − (refc − refr); loss = −(1−ε)·logσ(βz) − ε·logσ(−βz)   (ε dpo_label_smoothing)
- ipo:   z as dpo on ā;                loss = (z − 1/(2β))²
- orpo:  o = (āc − ār) − (log(1−e^āc) − log(1−e^ār)); loss = −āc − β·logσ(o)
- simpo: z = (āc − ār) − γ/β;          loss = −(1−ε)·logσ(βz) − ε·logσ(−βz) − cpo_alpha·āc
- kto:   r = l − ref; z₀ = max(0, mean r).detach() over the micro-batch's completions;
         loss = w_d·(1 − σ(β(r − z₀))) desirable, w_u·(1 − σ(β(z₀ − r))) undesirable
Rewards: dpo β(l − ref) (ipo on ā); orpo and simpo β·ā. The loss of a micro-batch is the sum over
its pairs divided by the global batch's pair count, so a step is the mean over the global batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from schemas.config import TrainingConfig

IGNORE = -100
# batches.read_step's varlen segments, found on the host (with the all-ones mask of a packed row,
# which spares transformers its packing check); rl rows are always packed (docs/contracts.md)
VARLEN_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "attention_mask")
LOGIT_CHUNK = 4096  # rows of logits upcast to fp32 at a time for the log-softmax


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label t+1 | logits t) over the flattened rows, 0 where that label is ignored; the
    logits upcast to fp32 LOGIT_CHUNK rows at a time."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    targets = labels[1:]  # token t predicts label t+1; a sequence's first label is IGNORE (collate)
    token_logp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for a in range(0, targets.numel(), LOGIT_CHUNK):
        b = min(a + LOGIT_CHUNK, targets.numel())
        token_logp[a:b] = -F.cross_entropy(logits[a:b].float(), targets[a:b], ignore_index=IGNORE, reduction="none")
    return token_logp


def sequence_sums(
    token_logp: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's target tokens, their count), sequences split at position
    resets; `token_logp[t]` is the flattened rows' log p(label t+1), as `token_logps` gives.
    `count`: the number of sequences when the host knows it (else it is read back from the device)."""
    labels, positions = labels.reshape(-1), position_ids.reshape(-1)
    segment = torch.cumsum(positions == 0, 0) - 1
    mask = (labels[1:] != IGNORE).float()
    count = int(segment[-1]) + 1 if count is None else count
    sums = torch.zeros(count, dtype=torch.float32, device=labels.device).index_add(0, segment[1:], token_logp * mask)
    tokens = torch.zeros(count, dtype=torch.float32, device=labels.device).index_add(0, segment[1:], mask)
    return sums, tokens


@dataclass(frozen=True)
class PairTerms:
    """Per-pair tensors (length = pairs): the loss and the rewards its metrics report."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor


def pair_terms(
    method: str, cfg: TrainingConfig, policy: tuple[torch.Tensor, torch.Tensor], reference: torch.Tensor | None
) -> PairTerms:
    """The formulas above; `policy` = (summed logps, token counts) of sequences c0, r0, c1, r1, ..."""
    beta, eps = cfg.rl_beta_value(), cfg.dpo_label_smoothing
    logps, tokens = policy
    lc, lr, nc, nr = logps[0::2], logps[1::2], tokens[0::2].clamp(min=1), tokens[1::2].clamp(min=1)
    if method in ("dpo", "ipo"):
        refc, refr = reference[0::2], reference[1::2]
        if method == "ipo":
            lc, lr, refc, refr = lc / nc, lr / nr, refc / nc, refr / nr
        z = (lc - lr) - (refc - refr)
        loss = (
            (z - 1 / (2 * beta)) ** 2
            if method == "ipo"
            else -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
        )
        return PairTerms(loss, beta * (lc - refc).detach(), beta * (lr - refr).detach())
    ac, ar = lc / nc, lr / nr
    if method == "orpo":
        odds = (ac - ar) - (
            torch.log1p(-torch.exp(ac).clamp(max=1 - 1e-6)) - torch.log1p(-torch.exp(ar).clamp(max=1 - 1e-6))
        )
        loss = -ac - beta * F.logsigmoid(odds)
    elif method == "simpo":
        z = (ac - ar) - cfg.simpo_gamma / beta
        loss = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z) - cfg.cpo_alpha * ac
    else:
        raise ValueError(f"not a pair method: {method}")
    return PairTerms(loss, beta * ac.detach(), beta * ar.detach())


def kto_terms(cfg: TrainingConfig, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor) -> PairTerms:
    """Per-completion KTO loss; the rewards are β·(l − ref), reported apart for desirable and undesirable."""
    beta = cfg.rl_beta_value()
    ratio = policy - reference
    z0 = ratio.mean().clamp(min=0).detach()
    good = desirable.bool()
    loss = torch.where(
        good,
        cfg.kto_desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        cfg.kto_undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    reward = beta * ratio.detach()
    return PairTerms(loss, torch.where(good, reward, 0.0), torch.where(good, 0.0, reward))


class PreferenceObjective:
    """The loss of one packed micro-batch for the trainer loop (worker/train/objective.py's contract)."""

    target_rows = False  # its losses are its own, not the fused mean loss over target rows
    metric_names = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "_chosen_n",
        "_rejected_n",
    )

    def __init__(self, cfg: TrainingConfig, model: torch.nn.Module, fused_token_losses: bool = False):
        """`fused_token_losses`: the model's forward is ftw_kernels' fused loss (kernels applied
        "fused_linear_cross_entropy"), asked for per-token losses instead of the logits."""
        self.cfg, self.model, self.fused_token_losses = cfg, model, fused_token_losses
        self.method = cfg.rl_method()
        self.needs_reference = self.method in ("dpo", "ipo", "kto")

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs (kto: completions) in a micro-batch: the items the loss is averaged over."""
        sequences = int((batch["position_ids"] == 0).sum())
        return sequences if self.method == "kto" else sequences // 2

    def logps(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's (summed log-prob, target count); through the fused loss, the tokens ×
        vocab logits are never materialised (kernels/ftw_kernels/cross_entropy.py)."""
        positions, labels = batch["position_ids"], batch["labels"]
        inputs, count = {"input_ids": batch["input_ids"], "position_ids": positions}, None
        if "cu_seq_lens_q" in batch:  # varlen attention: the segments the prefetcher found on the host (no sync)
            inputs |= {k: batch[k] for k in VARLEN_INPUTS}
            count = batch["cu_seq_lens_q"].numel() - 1  # rl rows are packed: a segment is a sequence
        if self.fused_token_losses:
            out = engine(**inputs, labels=labels, token_losses=True, use_cache=False)
            token_logp = -out.loss[:-1]  # the last token of the batch has no label to predict
        else:
            token_logp = token_logps(engine(**inputs, use_cache=False).logits, labels)
        return sequence_sums(token_logp, labels, positions, count)

    def reference(self, engine, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.needs_reference:
            return None
        disabled = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        with torch.no_grad(), disabled:
            return self.logps(engine, batch)[0]

    def loss(
        self, engine, batch: dict[str, torch.Tensor], n_items: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of this micro-batch's losses / n_items, metric sums for `metrics`)."""
        reference = self.reference(engine, batch)
        policy = self.logps(engine, batch)
        if self.method == "kto":
            terms = kto_terms(self.cfg, policy[0], reference, batch["desirable"].to(policy[0].device))
            good = batch["desirable"].to(policy[0].device).float()
            counts = (good.sum(), (1 - good).sum())
            margin = accuracy = torch.zeros((), device=good.device)
        else:
            terms = pair_terms(self.method, self.cfg, policy, reference)
            counts = (torch.tensor(float(terms.loss.numel()), device=terms.loss.device),) * 2
            margin = (terms.chosen_reward - terms.rejected_reward).sum()
            accuracy = (terms.chosen_reward > terms.rejected_reward).float().sum()
        sums = torch.stack([terms.chosen_reward.sum(), terms.rejected_reward.sum(), margin, accuracy, *counts]).double()
        return terms.loss.sum() / n_items, sums

    def metrics(self, sums: list[float], n_items: float) -> dict[str, float]:
        chosen, rejected, margin, accuracy, n_chosen, n_rejected = sums
        out = {"rewards/chosen": chosen / max(n_chosen, 1), "rewards/rejected": rejected / max(n_rejected, 1)}
        if self.method != "kto":
            out |= {"rewards/margins": margin / max(n_items, 1), "rewards/accuracies": accuracy / max(n_items, 1)}
        return out

    def close(self) -> None:
        """Nothing to release."""

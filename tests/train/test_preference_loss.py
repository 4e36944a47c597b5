"""Loss parity of the DPO family: ftw's packed objective (chosen and rejected in one row, reference =
adapter disabled) against a plain-PyTorch reference that runs every sequence alone, with a separate
copy of the base model as the reference, and writes each paper's formula out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from schemas.config import TrainingConfig
from tests.conftest import randomise_lora_b
from worker.train.batches import collate
from worker.train.preference import PreferenceObjective

BETA = 0.3


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    frozen = copy.deepcopy(base).eval()
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    )
    randomise_lora_b(model, std=0.05)  # make the adapter change the outputs
    return model.eval(), frozen


def sequences(seed: int, n: int, vocab: int) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of n random sequences of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        prompt, answer = 3 + k % 4, 4 + (3 * k) % 7
        out.append((torch.randint(5, vocab, (prompt + answer,), generator=g).tolist(), prompt))
    return out


def packed(seqs, kto_flags=None):
    """One packed row as the prepared cache holds it (labels -100 on the prompts)."""
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, prompt in seqs:
        row["input_ids"] += ids
        row["labels"] += [-100] * prompt + ids[prompt:]
        row["position_ids"] += list(range(len(ids)))
    if kto_flags is not None:
        row["desirable"] = kto_flags
    return collate([row], 0, packed=True)


def alone_logps(model, ids: list[int], prompt: int) -> tuple[torch.Tensor, int]:
    """Summed log p(answer tokens | prefix) of one sequence, run on its own."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp[prompt - 1 :].sum(), len(ids) - prompt


def reference_loss(method: str, cfg: TrainingConfig, model, frozen, seqs, flags=None) -> torch.Tensor:
    pol = [alone_logps(model, ids, p) for ids, p in seqs]
    with torch.no_grad():
        ref = [alone_logps(frozen, ids, p)[0] for ids, p in seqs]
    if method == "kto":
        ratios = torch.stack([pol[i][0] - ref[i] for i in range(len(seqs))])
        z0 = max(ratios.detach().mean().item(), 0.0)
        losses = [
            (1 - torch.sigmoid(BETA * (r - z0))) * cfg.kto_desirable_weight
            if f
            else (1 - torch.sigmoid(BETA * (z0 - r))) * cfg.kto_undesirable_weight
            for r, f in zip(ratios, flags)
        ]
        return torch.stack(losses).mean()
    losses = []
    for i in range(0, len(seqs), 2):
        (lc, nc), (lr, nr), rc, rr = pol[i], pol[i + 1], ref[i], ref[i + 1]
        if method == "dpo":
            z = (lc - lr) - (rc - rr)
            ls = cfg.dpo_label_smoothing
            losses.append(-(1 - ls) * F.logsigmoid(BETA * z) - ls * F.logsigmoid(-BETA * z))
        elif method == "ipo":
            z = (lc / nc - lr / nr) - (rc / nc - rr / nr)
            losses.append((z - 1 / (2 * BETA)) ** 2)
        elif method == "orpo":
            ac, ar = lc / nc, lr / nr
            log_odds = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
            losses.append(-ac - BETA * F.logsigmoid(log_odds))
        elif method == "simpo":
            ac, ar = lc / nc, lr / nr
            z = (ac - ar) - cfg.simpo_gamma / BETA
            losses.append(-F.logsigmoid(BETA * z) - cfg.cpo_alpha * ac)
    return torch.stack(losses).mean()


def config(method: str, **extra) -> TrainingConfig:
    rl = {"ipo": "dpo"}.get(method, method)
    more = {"dpo_loss_type": ["ipo"]} if method == "ipo" else {}
    return TrainingConfig(base_model="m", learning_rate=1e-4, adapter="lora", rl=rl, rl_beta=BETA, **more, **extra)


def lora_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dpo", {}),
        ("dpo", {"dpo_label_smoothing": 0.1}),
        ("ipo", {}),
        ("orpo", {}),
        ("simpo", {"simpo_gamma": 0.7, "cpo_alpha": 0.5}),
        ("kto", {"kto_undesirable_weight": 1.5}),
    ],
)
def test_packed_loss_and_gradients_match_the_formula_run_sequence_by_sequence(models, method, extra):
    model, frozen = models
    cfg = config(method, **extra)
    seqs = sequences(1, 6, model.config.vocab_size)
    flags = [1, 0, 1, 1, 0, 0] if method == "kto" else None
    objective = PreferenceObjective(cfg, model)
    batch = packed(seqs, flags)
    n_items = torch.tensor(float(objective.count(batch)))
    assert objective.count(batch) == (6 if method == "kto" else 3)

    model.zero_grad()
    ours, sums = objective.loss(model, batch, n_items)
    ours.backward()
    ours_grad = lora_grads(model)
    model.zero_grad()
    want = reference_loss(method, cfg, model, frozen, seqs, flags)
    want.backward()
    want_grad = lora_grads(model)

    assert math.isclose(ours.item(), want.item(), rel_tol=1e-4), (ours.item(), want.item())
    assert torch.allclose(ours_grad, want_grad, rtol=1e-3, atol=1e-6 * want_grad.abs().max().item())
    metrics = objective.metrics(sums.tolist(), float(n_items))
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected"}
    if method != "kto":
        assert math.isclose(
            metrics["rewards/margins"],
            metrics["rewards/chosen"] - metrics["rewards/rejected"],
            rel_tol=1e-6,
            abs_tol=1e-9,
        )
        assert 0.0 <= metrics["rewards/accuracies"] <= 1.0


def test_reference_is_the_base_with_the_adapter_disabled(models):
    """The reference log-probs equal a separate copy of the base model's, and differ from the policy's."""
    model, frozen = models
    objective = PreferenceObjective(config("dpo"), model)
    seqs = sequences(2, 4, model.config.vocab_size)
    batch = packed(seqs)
    ref = objective.reference(model, batch)
    want = torch.stack([alone_logps(frozen, ids, p)[0] for ids, p in seqs]).detach()
    assert torch.allclose(ref, want, rtol=1e-4)
    assert not torch.allclose(objective.logps(model, batch)[0], want, rtol=1e-3)

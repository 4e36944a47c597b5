"""The DPO family through the fused loss: per-token losses from the last hidden states
(kernels/ftw_kernels/cross_entropy.py) give the same loss and adapter gradients as the logits
path of the same patched model (the two differ only in the output layer's loss, so the bounds
hold on a GPU too), while the fused forwards return no logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from ftw_kernels import apply_kernels
from tests.kernels.test_apply_kernels import VOCAB, tiny, training_config
from tests.train.test_preference_loss import packed, sequences
from worker.train.objective import build_objective
from worker.train.preference import PreferenceObjective

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dpo_loss_and_grads(objective, engine, model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = objective.loss(engine, batch, torch.tensor(float(objective.count(batch))))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_fused_token_losses_match_the_logits_path(method, modules_to_save):
    """A trained lm_head (modules_to_save) needs the output weight's gradient from per-row weights;
    the reference forward (adapter disabled, no_grad) reads the original head."""
    fused = tiny(LlamaConfig, modules_to_save=modules_to_save)
    cfg = training_config(use_kernels=True, rl=method, rl_beta=0.3)
    kernels = apply_kernels(fused, cfg)
    assert "fused_linear_cross_entropy" in kernels
    if modules_to_save:  # the trained copy differs from the original: the reference must not read it
        with torch.no_grad():
            fused.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    flags = [1, 0, 1, 1] if method == "kto" else None
    batch = {k: v.to(DEVICE) for k, v in packed(sequences(3, 4, VOCAB), flags).items()}
    objective = build_objective(cfg, fused, tokenizer=None, kernels=kernels)
    assert objective.fused_token_losses

    logits_seen = []

    def engine(**kwargs):
        out = fused(**kwargs)
        logits_seen.append(out.logits)
        return out

    want, want_grads = dpo_loss_and_grads(PreferenceObjective(cfg, fused), fused, fused, batch)
    got, got_grads = dpo_loss_and_grads(objective, engine, fused, batch)
    assert logits_seen == [None, None]  # the reference and the policy forward
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
    assert got_grads.keys() == want_grads.keys()
    assert any("lm_head" in n for n in got_grads) == bool(modules_to_save)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item()), name


def test_fused_token_losses_in_eval():
    """Evaluation (eval mode, no_grad) takes the fused path too: an unpatched original forward
    would not know the `token_losses` argument."""
    fused = tiny(LlamaConfig).eval()
    cfg = training_config(use_kernels=True, rl="dpo", rl_beta=0.3)
    batch = {k: v.to(DEVICE) for k, v in packed(sequences(4, 4, VOCAB)).items()}
    objective = build_objective(cfg, fused, tokenizer=None, kernels=apply_kernels(fused, cfg))
    with torch.no_grad():
        got, _ = objective.loss(fused, batch, torch.tensor(2.0))
        want, _ = PreferenceObjective(cfg, fused).loss(fused, batch, torch.tensor(2.0))
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)


def test_grpo_completion_logps_through_the_fused_loss():
    """GRPO's log-probs of left-padded prompts + right-padded completions: the fused per-token losses
    give the logits path's values on every counted completion token, and the same adapter gradients
    for a loss over them (masked tokens count nowhere: the objective multiplies by the mask)."""
    from worker.train.grpo import completion_logps, rollout_of

    model = tiny(LlamaConfig)
    cfg = training_config(use_kernels=True, rl="grpo")
    assert "fused_linear_cross_entropy" in apply_kernels(model, cfg)
    prompts = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    prompt_mask = (torch.arange(5) < torch.tensor([[3], [5]])).long()
    completions = [[20, 21, 22, 3], [23, 24], [25, 3], [26, 27, 28, 29, 30]]
    rollout = rollout_of(prompts, prompt_mask, completions, 2, eos_id=3, pad_id=0, mask_truncated=True)
    rollout = type(rollout)(*(x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in vars(rollout).values()))
    mask = rollout.completion_mask.bool()
    assert mask.any() and not mask.all()  # two completions end without EOS: masked

    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        logp = completion_logps(model, rollout, fused=fused)
        (logp * mask).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    assert got.shape == want.shape and torch.allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item()), name

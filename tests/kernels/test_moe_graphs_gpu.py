"""MoE blocks replayed as real CUDA graphs (kernels/ftw_kernels/moe_graphs.py; skipped without CUDA): a
Qwen3-MoE with every kernel trains the same with its blocks captured as without, and the calls a
graph does not reproduce (adapters off, evaluation, a shorter packed row padded) give the eager
results."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.kernels.conftest import rel_err
from tests.kernels.test_moe_model import config, lora_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOKENS = 512


GPU_SHAPE = dict(  # several experts a token, sizes of a real layer's proportions
    vocab_size=4096,
    hidden_size=512,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    moe_intermediate_size=256,
    intermediate_size=1024,
    num_experts=16,
    num_experts_per_tok=4,
)


def packed(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4096, (1, tokens), generator=g)
    cut = tokens // 3
    pos = torch.cat([torch.arange(cut), torch.arange(tokens - cut)])[None]
    labels = ids.clone()
    labels[0, 0] = labels[0, cut] = -100
    return {k: v.cuda() for k, v in dict(input_ids=ids, position_ids=pos, labels=labels).items()}


def test_moe_blocks_as_cuda_graphs_train_like_eager_blocks(rng_seed, monkeypatch):
    from ftw_kernels import apply_kernels

    cfg = config(sample_packing=True, micro_batch_size=2, sequence_len=TOKENS // 2, lora_dropout=0.0)
    graphed = lora_model(cfg, device="cuda", dtype=torch.bfloat16, **GPU_SHAPE)
    eager = copy.deepcopy(graphed)
    assert "moe_graphs" in apply_kernels(graphed, cfg)
    monkeypatch.setenv("FTW_MOE_GRAPHS", "0")
    assert "moe_graphs" not in apply_kernels(eager, cfg)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (graphed, eager)]
    for step in range(5):
        batch = packed(TOKENS, step)
        losses = []
        for model, optimizer in zip((graphed, eager), optimizers):
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        assert rel_err(losses[0], losses[1]) < 2e-3, (rng_seed, step, losses)
    graphs = graphed._ftw_moe_graphs
    assert graphs.graphed is not None and graphs.replays == 2 * 4  # two blocks, every step after the first
    trained = dict(eager.named_parameters())
    for name, p in graphed.named_parameters():
        if p.requires_grad:
            assert rel_err(p, trained[name]) < 1e-2, (rng_seed, name)

    batch = {k: v for k, v in packed(TOKENS, 99).items() if k != "labels"}  # logits: the fused loss keeps none
    replays = graphs.replays
    with graphed.disable_adapter(), eager.disable_adapter():  # DPO's reference pass: the same shape
        off = [m(**batch, use_cache=False).logits for m in (graphed, eager)]
    on = eager(**batch, use_cache=False).logits
    assert rel_err(off[0], off[1]) < 1e-2 and rel_err(on, off[1]) > 5e-2
    with torch.no_grad():
        evaluated = [m.eval()(**batch, use_cache=False).logits for m in (graphed, eager)]
    # both eager; the models' adapters differ by the training steps' bf16 noise, which a LoRA term as
    # large as the base output (B ~ N(0, 0.2)) carries into the logits
    assert rel_err(evaluated[0], evaluated[1]) < 5e-2
    assert graphs.replays == replays
    # a packed row a little short of the capture: padded and replayed, against the eager blocks at the same
    # weights (the two models' trained weights differ by bf16 noise, which the gradients amplify)
    eager.load_state_dict(graphed.state_dict())
    short = packed(TOKENS - 32, 100)
    losses = [m.train()(**short, use_cache=False).loss for m in (graphed, eager)]
    for loss in losses:
        loss.backward()
    assert graphs.replays == replays + 2 and rel_err(losses[0], losses[1]) < 2e-3
    grads = dict(eager.named_parameters())
    for name, p in graphed.named_parameters():
        if p.grad is not None and "experts" in name:
            assert rel_err(p.grad, grads[name].grad) < 2e-2, (rng_seed, name)

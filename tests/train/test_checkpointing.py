"""Which gradient checkpointing a run gets (worker/train/model.checkpointing_kwargs) and that it changes no number.

Supervised training of a dense model in a lone process checkpoints reentrant: each layer's first forward
runs without autograd, so the graph the host builds per step holds one node a layer instead of the layer's
ops (the host time that made QLoRA with float8 matmuls up to 1.44× faster under checkpointing,
docs/benchmarks.md). A config's own `gradient_checkpointing_kwargs`, a process group, a MoE model, the
preference/RL objectives and torch_compile get what they need (worker/train/model.checkpointing_kwargs says why).
"""

from __future__ import annotations

import torch

from tests.train.helpers import base_config, cpu_lora_model

CPU = torch.device("cpu")


def graph_nodes(loss: torch.Tensor) -> int:
    """The autograd nodes backward will run: what the forward built on the host."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def loss_graph_and_grads(model) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    nodes = graph_nodes(loss)
    loss.backward()
    return loss.detach(), nodes, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_lone_process_checkpoints_reentrant_builds_one_node_a_layer_and_the_same_gradients(four_layer_model_dir):
    plain_loss, plain_nodes, plain = loss_graph_and_grads(cpu_lora_model(four_layer_model_dir))
    loss, nodes, grads = loss_graph_and_grads(cpu_lora_model(four_layer_model_dir, gradient_checkpointing=True))
    kept = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    _, non_reentrant_nodes, non_reentrant = loss_graph_and_grads(cpu_lora_model(four_layer_model_dir, **kept))
    layers = 4
    # the non-reentrant kind builds every op's node in forward (and recomputes them); the default builds
    # one per layer: what is left is the embedding, final norm and head around them
    assert non_reentrant_nodes >= plain_nodes > 5 * layers
    assert nodes <= plain_nodes - 5 * layers
    assert torch.equal(loss, plain_loss)
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(non_reentrant[name], g, rtol=0, atol=0, msg=name)


def test_the_config_moe_rl_compile_or_a_process_group_choose_the_non_reentrant_kind(tmp_path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from schemas.config import TrainingConfig
    from tests.kernels.test_moe_model import tiny_moe
    from worker.train.model import checkpointing_kwargs

    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    cfg = TrainingConfig.model_validate(base_config(tmp_path, gradient_checkpointing=True))
    assert checkpointing_kwargs(cfg, dense) == {"use_reentrant": True}
    named = {"use_reentrant": False, "preserve_rng_state": False}
    own = TrainingConfig.model_validate(
        base_config(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=named)
    )
    assert checkpointing_kwargs(own, dense) == named
    # the router's aux loss reads logits recorded in the forward: a reentrant one would record them without grad
    assert checkpointing_kwargs(cfg, tiny_moe()) == {"use_reentrant": False}
    dpo = TrainingConfig.model_validate(
        base_config(
            tmp_path, gradient_checkpointing=True, rl="dpo", datasets=[{"path": "p.jsonl", "type": "chatml.intel"}]
        )
    )
    assert checkpointing_kwargs(dpo, dense) == {"use_reentrant": False}
    for compiled in (True, "auto"):
        compiling = TrainingConfig.model_validate(
            base_config(tmp_path, gradient_checkpointing=True, torch_compile=compiled)
        )
        assert checkpointing_kwargs(compiling, dense) == {"use_reentrant": False}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert checkpointing_kwargs(cfg, dense) == {"use_reentrant": False}
    finally:
        dist.destroy_process_group()

"""The dispatch between a MoE block's CUDA graphs and its eager forward (kernels/ftw_kernels/moe_graphs.py),
on CPU: the graph maker is replaced by one that records what it was asked to capture and whose
"replay" runs the block's own forward on the (padded) input. What is checked is what decides
correctness: which calls replay, which run eagerly, that a padded replay gives the unpadded result
and gradients, and that the registry installs it only where a replay is the same computation. The
capture itself runs on the GPU (tests/kernels/test_gpu.py)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from ftw_kernels import moe_graphs
from tests.kernels.test_moe_model import config, lora_model


class RecordingGraphs:
    """Stands in for torch.cuda.make_graphed_callables: installs a 'graphed' forward that counts its
    calls and runs the block's class forward (the computation a graph replays)."""

    def __init__(self, fail: bool = False):
        self.captures: list[list[tuple]] = []
        self.fail = fail

    def __call__(self, blocks, samples, **options):
        self.captures.append([(tuple(x.shape), x.requires_grad) for (x,) in samples])
        for block, (x,) in zip(blocks, samples):
            block(x)  # a warm-up call, as make_graphed_callables makes: must run eagerly
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        for block in blocks:
            block.forward = lambda h, b=block: type(b).forward(b, h)


def graphed_model(capture_shape=None, fail=False):
    """(model with graph dispatch, its untouched twin, the dispatch, the recording graph maker)."""
    model = lora_model(config(lora_target_modules=["q_proj", "v_proj", "gate"])).train()
    reference = copy.deepcopy(model)
    maker = RecordingGraphs(fail)
    graphs = moe_graphs.MoEBlockGraphs(moe_graphs.moe_blocks(model), capture_shape, maker, device_type="cpu")
    return model, reference, graphs, maker


def step(model, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_blocks_run_eagerly_once_then_are_captured_together_and_replayed():
    model, reference, graphs, maker = graphed_model()
    ids = torch.randint(0, 128, (2, 12))
    assert_same(step(model, ids), step(reference, ids))  # the first call of each block: eager, recorded
    assert maker.captures == [] and graphs.replays == 0
    assert_same(step(model, ids), step(reference, ids))
    # one capture, of every block, at the recorded input (the hidden states carry grad: LoRA on q/v)
    assert maker.captures == [[((2, 12, 64), True), ((2, 12, 64), True)]]
    assert graphs.replays == 2
    step(model, ids)
    assert graphs.replays == 4 and len(maker.captures) == 1


def test_calls_a_graph_does_not_reproduce_run_eagerly():
    model, _, graphs, maker = graphed_model()
    ids = torch.randint(0, 128, (2, 12))
    step(model, ids), step(model, ids)
    replays = graphs.replays
    with torch.no_grad():  # evaluation, generation
        model(input_ids=ids, use_cache=False)
    model.eval()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.train()
    with model.disable_adapter():  # DPO's reference pass: the same shape, adapters off (with grad on)
        model(input_ids=ids, labels=ids, use_cache=False)
    step(model, torch.randint(0, 128, (2, 16)))  # longer than the capture
    step(model, torch.randint(0, 128, (1, 12)))  # half its tokens: padding would cost more than it saves
    assert graphs.replays == replays
    step(model, ids)
    assert graphs.replays == replays + 2


def test_a_slightly_shorter_packed_row_replays_padded_with_the_unpadded_result():
    """Zero rows add nothing to any gradient: the padded replay equals the eager call exactly."""
    model, reference, graphs, _ = graphed_model(capture_shape=(1, 20))
    full, short = torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (1, 18))
    step(model, full), step(reference, full)
    step(model, full), step(reference, full)
    replays = graphs.replays
    assert_same(step(model, short), step(reference, short))
    assert graphs.replays == replays + 2


def test_a_failed_capture_leaves_the_eager_path_and_says_why(caplog):
    model, reference, graphs, maker = graphed_model(fail=True)
    ids = torch.randint(0, 128, (2, 12))
    step(model, ids), step(reference, ids)
    with caplog.at_level(logging.WARNING, logger="ftw.kernels"):
        assert_same(step(model, ids), step(reference, ids))
    assert "capturing them as CUDA graphs failed" in caplog.text and "operation not permitted" in caplog.text
    assert_same(step(model, ids), step(reference, ids))
    assert len(maker.captures) == 1 and graphs.replays == 0


@pytest.mark.parametrize(
    ("extra", "env", "reason"),
    [
        ({"sample_packing": True}, {}, None),
        ({"pad_to_sequence_len": True}, {}, None),
        ({}, {}, "micro-batches change shape"),
        ({"sample_packing": True, "gradient_checkpointing": True}, {}, "gradient checkpointing"),
        ({"sample_packing": True, "output_router_logits": True}, {}, "output_router_logits"),
        ({"sample_packing": True, "torch_compile": True}, {}, "torch_compile"),
        ({"sample_packing": True, "deepspeed": "zero2"}, {}, "DeepSpeed or FSDP"),
        ({"sample_packing": True}, {"FTW_MOE_GRAPHS": "0"}, "FTW_MOE_GRAPHS=0"),
    ],
)
def test_the_registry_installs_graphs_only_where_a_replay_is_the_same_computation(
    extra, env, reason, monkeypatch, caplog
):
    from ftw_kernels import registry

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = config(micro_batch_size=2, sequence_len=64, **extra)
    model = lora_model(cfg)
    with caplog.at_level(logging.INFO, logger="ftw.kernels"):
        applied = registry._moe_graphs(model, cfg)
    if reason is None:
        assert applied == ["moe_graphs"]
        shape = (1, 128) if extra.get("sample_packing") else (2, 64)
        assert model._ftw_moe_graphs.capture_shape == shape
    else:
        assert applied == [] and reason in caplog.text and not hasattr(model, "_ftw_moe_graphs")

"""worker/train/graphed_update.py: the clip and the optimizer step replayed as one CUDA graph must give the eager
step's parameters and norms, step after step, fall back to the eager step wherever a replay would not be the same
computation, and be refused (with the reason) where it cannot hold."""

from __future__ import annotations

import json

import pytest
import torch

from worker.train import graphed_update
from worker.train.graphed_update import GraphedUpdate, graph_blocker
from worker.train.optim import clip_gradients

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run through the device tool)")


def adamw(params, **kw) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=2.0**-6, fused=True, **kw)


def test_the_blocker_names_each_case_the_graph_cannot_hold(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    assert graph_blocker(adamw(params), params, CUDA, 1, False) is None
    assert "cpu" in graph_blocker(adamw(params), params, torch.device("cpu"), 1, False)
    assert "several processes" in graph_blocker(adamw(params), params, CUDA, 2, False)
    assert "loss scaler" in graph_blocker(adamw(params), params, CUDA, 1, True)
    assert "AdamW is not torch's fused" in graph_blocker(
        torch.optim.AdamW(params, foreach=True), params, CUDA, 1, False
    )
    assert "SGD" in graph_blocker(torch.optim.SGD(params, lr=0.1), params, CUDA, 1, False)
    tensor_lr = torch.optim.AdamW(params, lr=torch.tensor(1e-2), fused=True)
    assert "a setting of the optimizer is a tensor" in graph_blocker(tensor_lr, params, CUDA, 1, False)
    mixed = params + [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    assert "several devices or in several dtypes" in graph_blocker(adamw(mixed), mixed, CUDA, 1, False)
    monkeypatch.setattr(graphed_update, "GRAPH_BYTES", 3 * 4 * 4 * 4 - 1)
    assert "second copy" in graph_blocker(adamw(params), params, CUDA, 1, False)
    monkeypatch.setattr(graphed_update, "GRAPH_BYTES", 1 << 30)
    monkeypatch.setenv("FTW_GRAPHED_UPDATE", "0")  # the operator's way to rule the graph out
    assert graph_blocker(adamw(params), params, CUDA, 1, False) == "FTW_GRAPHED_UPDATE=0 in the environment"
    monkeypatch.setenv("FTW_GRAPHED_UPDATE", "1")
    assert graph_blocker(adamw(params), params, CUDA, 1, False) is None


def test_a_capture_that_fails_leaves_every_step_eager_and_the_step_as_it_was(caplog, monkeypatch):
    """A graph that cannot be built (here: out of memory, as a GPU short of room for the buffers raises; the same
    on a machine with CUDA and without): the update warns once, hands each later step to the eager path, and leaves
    the gradients and the optimizer's settings as the eager step left them."""

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(graphed_update.torch.cuda, "CUDAGraph", out_of_memory)
    params = [torch.nn.Parameter(torch.ones(4, 4)) for _ in range(2)]
    optimizer = adamw(params)
    for p in params:
        p.grad = torch.full((4, 4), 0.5)
    optimizer.step()
    grads = [p.grad for p in params]
    update = GraphedUpdate(optimizer, params, 1.0)
    with caplog.at_level("WARNING", logger="ftw.train"):
        update.capture()
        update.capture()  # tried once: not again
    assert [r.message for r in caplog.records if "eagerly" in r.message] and len(caplog.records) == 1
    assert all(p.grad is g for p, g in zip(params, grads)) and update.grads == [] and update.norm is None
    assert all(group["lr"] == 2.0**-6 and group["capturable"] is False for group in optimizer.param_groups)
    assert update.replay() is None


class KernelWrites:
    """Stands in for the captured graph, which CPU torch cannot build: its replay writes the parameters the way the
    graph's kernels do, through their storage, without an op that moves their version counters."""

    def __init__(self, params: list[torch.Tensor], copies=None):
        self.params, self.copies = params, copies

    def replay(self) -> None:
        for p in self.params:
            p.data.add_(1.0)  # `.data` has a version counter of its own: p's does not move
        if self.copies is not None:
            self.copies.run()  # the adapter copies' refresh, captured after the step


def replaying(params: list[torch.Tensor], copies=None) -> GraphedUpdate:
    """An update whose "graph" is the stand-in above, as `capture()` would leave it (with `copies`, the plan)."""
    update = GraphedUpdate(adamw(params), params, float("inf"))
    update.graph, update.settings, update.copies = KernelWrites(params, copies), update._settings(), copies
    update.grads, update.lrs, update.norm = [torch.zeros_like(p) for p in params], [torch.zeros(())], torch.zeros(())
    return update


def test_a_replay_refreshes_the_adapter_copies_the_next_forward_reads():
    """The bf16 copies of the adapter weights (ftw_kernels.adapter_copies) are refreshed when a parameter changes;
    a replayed step calls no `optimizer.step()` and runs no op on the parameters, so it must say they changed, or
    every forward after the first replay computes with the weights of step 1 (found on the GPU: a trainer's loss
    curve fell slower than its eager twin's from step 3 on)."""
    from ftw_kernels.adapter_copies import stacked

    params = [torch.nn.Parameter(torch.ones(2, 4)), torch.nn.Parameter(torch.ones(3, 4))]
    update = replaying(params)
    assert torch.equal(stacked([params], torch.bfloat16)[0], torch.ones(5, 4, dtype=torch.bfloat16))
    for p in params:
        p.grad = torch.zeros_like(p)
    assert update.replay() is update.norm
    assert torch.equal(stacked([params], torch.bfloat16)[0], torch.full((5, 4), 2.0, dtype=torch.bfloat16))


def test_a_replay_that_refreshed_the_copies_leaves_the_host_nothing_to_copy(count_host_refreshes):
    """The graph refreshes the copies made of its parameters after the step (ftw_kernels.adapter_copies.RefreshPlan):
    after a replay the next forward reads them as they are, without a host refresh; a copy the graph does not hold
    (it also reads a frozen tensor) is refreshed at its use, as after an eager step."""
    from ftw_kernels import adapter_copies

    params = [torch.nn.Parameter(torch.ones(2, 4)), torch.nn.Parameter(torch.ones(3, 4))]
    frozen = torch.zeros(1, 4)
    assert torch.equal(adapter_copies.stacked([params], torch.bfloat16)[0], torch.ones(5, 4, dtype=torch.bfloat16))
    assert torch.equal(
        adapter_copies.stacked([[params[0], frozen]], torch.bfloat16)[0][:2], torch.ones(2, 4, dtype=torch.bfloat16)
    )
    update = replaying(params, adapter_copies.RefreshPlan(params))
    refreshes = count_host_refreshes()
    for step in (2.0, 3.0):
        for p in params:
            p.grad = torch.zeros_like(p)
        assert update.replay() is update.norm
        assert torch.equal(
            adapter_copies.stacked([params], torch.bfloat16)[0], torch.full((5, 4), step, dtype=torch.bfloat16)
        )
        assert refreshes == [1] * int(step - 2)
        mixed = adapter_copies.stacked([[params[0], frozen]], torch.bfloat16)[0]
        assert torch.equal(mixed[:2], torch.full((2, 4), step, dtype=torch.bfloat16)) and refreshes == [1] * int(
            step - 1
        )


def model_and_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
    ).to(CUDA)
    batches = [torch.randn(64, 16, generator=g).to(CUDA) for _ in range(8)]
    return model, batches


def train(graphed: bool, max_norm: float, unused_at: int | None = None, betas_at: int | None = None):
    """Eight steps of a small model with a learning rate halved each step (powers of two: the float32 rate the
    graph reads is the eager step's double exactly, so the two agree bit for bit); `unused_at`: a step whose loss
    leaves the last layer out (its tensors get no gradient); `betas_at`: from this step on, other betas."""
    torch.manual_seed(0)
    model, batches = model_and_batches()
    params = list(model.parameters())
    optimizer = adamw(params, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    update = GraphedUpdate(optimizer, params, max_norm) if graphed else None
    norms, replayed = [], []
    for step, x in enumerate(batches):
        if step == betas_at:
            for group in optimizer.param_groups:
                group["betas"] = (0.8, 0.99)
        loss = (model[:3](x) ** 2).mean() if step == unused_at else (model(x) ** 2).mean()
        loss.backward()
        norm = update.replay() if update is not None else None
        replayed.append(norm is not None)
        if norm is None:
            norm = clip_gradients(params, max_norm)
            optimizer.step()
            if update is not None:
                update.capture()
        norms.append(norm.clone())
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params], torch.stack(norms), replayed


@needs_cuda
@pytest.mark.parametrize("max_norm", [0.01, float("inf")], ids=["clipping", "no-bound"])
def test_replayed_steps_give_the_eager_steps_parameters_and_norms(max_norm):
    eager_params, eager_norms, _ = train(False, max_norm)
    params, norms, replayed = train(True, max_norm)
    assert replayed == [False] + [True] * 7  # the first step creates the state and is captured after
    assert torch.equal(norms, eager_norms)
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
    if max_norm < 1:
        assert bool((eager_norms > max_norm).all())  # the bound clipped every step


@needs_cuda
def test_the_captured_graph_refreshes_the_adapter_copies(count_host_refreshes):
    """On CUDA: after each replay the bf16 copies (one of them scaled, as LoRA's s·B) equal the updated weights
    cast, and no forward after a replay refreshes them on the host (only the first use and the step after the
    eager first step do)."""
    from ftw_kernels import adapter_copies

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 32, device=CUDA)), torch.nn.Parameter(torch.randn(32, 4, device=CUDA))]
    optimizer = adamw(params)
    update = GraphedUpdate(optimizer, params, 1.0)
    x = torch.randn(8, 32, device=CUDA)
    refreshes = count_host_refreshes()
    replayed = []
    for _ in range(5):
        a, b = adapter_copies.stacked([[params[0]], [params[1]]], torch.bfloat16, scales=[1.0, 2.0])
        assert torch.equal(a, params[0].detach().bfloat16())
        assert torch.equal(b, (2.0 * params[1].detach()).bfloat16())
        ((x @ params[0].t()) @ params[1].t()).square().mean().backward()
        replayed.append(update.replay() is not None)
        if not replayed[-1]:
            clip_gradients(params, 1.0)
            optimizer.step()
            update.capture()
        optimizer.zero_grad(set_to_none=True)
    assert replayed == [False, True, True, True, True] and len(update.copies) == 2
    assert len(refreshes) == 2


@needs_cuda
def test_a_step_without_some_gradients_and_changed_betas_run_eagerly_on_the_same_state():
    eager_params, eager_norms, _ = train(False, 0.05, unused_at=3, betas_at=6)
    params, norms, replayed = train(True, 0.05, unused_at=3, betas_at=6)
    assert replayed == [False, True, True, False, True, True, False, False]
    assert torch.equal(norms, eager_norms)
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))


@needs_cuda
def test_the_trainer_replays_its_update_and_matches_an_eager_run(task_model_dir, task_rows, tmp_path, monkeypatch):
    """The real trainer on CUDA with the default fused AdamW: the graph is captured after step 1 and every later
    step replays it; the loss curve and the saved adapter match a run whose update stays eager."""
    from tests.train.helpers import adapter_tensors, base_config, run_inprocess, write_cache
    from worker.train import trainer

    train_rows, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", train_rows[:48])
    cfg = base_config(task_model_dir, max_steps=6, save_strategy="no", optimizer="adamw_torch_fused", max_grad_norm=0.1)
    captured = []
    capture = GraphedUpdate.capture
    monkeypatch.setattr(GraphedUpdate, "capture", lambda self: captured.append(self.tried) or capture(self))
    assert run_inprocess(cfg, tmp_path / "graphed", cache) == 0
    assert captured == [False]  # once, after the first step: every later step replayed
    monkeypatch.setattr(trainer, "graph_blocker", lambda *args: "eager for the comparison")
    assert run_inprocess(cfg, tmp_path / "eager", cache) == 0
    curves = [json.loads((tmp_path / run / "summary.json").read_text())["loss_curve"] for run in ("graphed", "eager")]
    assert [s for s, _ in curves[0]] == list(range(1, 7))
    assert [loss for _, loss in curves[0]] == pytest.approx([loss for _, loss in curves[1]], rel=1e-3)
    a, b = (adapter_tensors(tmp_path / run / "adapter") for run in ("graphed", "eager"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-5) for k in a)

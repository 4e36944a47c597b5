"""The fused LoRA ops with cached compute-dtype adapter copies and stacked down-projections:
never a stale copy (in-place writes, optimizer steps that bypass the version counter), the same
numbers as casting at every use, one batched refresh per change, and stacked q/k/v and gate/up
against separate float64 projections (unequal output sizes, ranks and scales)."""

from __future__ import annotations

import gc

import pytest
import torch

from ftw_kernels import adapter_copies, lora_products
from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections
from tests.kernels.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = 1.5e-2


def projection(out: int, inp: int, rank: int, scale: float, dtype=torch.bfloat16, bias: bool = False) -> Projection:
    """Frozen weight (and bias) in `dtype`, trainable fp32 A and B as PEFT keeps them."""
    w = (torch.randn(out, inp, device=DEVICE) / inp**0.5).to(dtype)
    b = torch.randn(out, device=DEVICE).to(dtype) if bias else None
    a = (torch.randn(rank, inp, device=DEVICE) / inp**0.5).requires_grad_()
    bb = (torch.randn(out, rank, device=DEVICE) / 2).requires_grad_()
    return Projection(w, b, a, bb, scale)


def reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """The projection in float64, from the current values of its tensors."""
    x = x.double()
    y = x @ p.weight.double().t()
    if p.lora_a is not None:
        y = y + p.scale * (x @ p.lora_a.double().t()) @ p.lora_b.double().t()
    return y + p.bias.double() if p.bias is not None else y


def mlp_reference(x, gate, up, down):
    return reference(torch.nn.functional.silu(reference(x, gate)) * reference(x, up), down)


def qkv_and_mlp(dtype=torch.bfloat16):
    d, inter = 32, 40
    qkv = [projection(32, d, 4, 2.0, dtype), projection(16, d, 4, 2.0, dtype), projection(16, d, 4, 2.0, dtype)]
    mlp = [
        projection(inter, d, 4, 0.5, dtype),
        projection(inter, d, 4, 0.5, dtype),
        projection(d, inter, 4, 0.5, dtype),
    ]
    return qkv, mlp


def test_in_place_write_reaches_the_next_call(rng_seed):
    """A weight changed in place (its version counter moves) is never read from a stale copy."""
    qkv, mlp = qkv_and_mlp()
    x = torch.randn(2, 5, 32, device=DEVICE).bfloat16()
    before = lora_projections(x, qkv)
    before_mlp = lora_gated_mlp(x, *mlp)
    with torch.no_grad():
        qkv[1].lora_a.add_(1.0)
        qkv[2].lora_b.mul_(-3.0)
        mlp[0].lora_a.add_(0.5)
        mlp[2].lora_b.add_(1.0)
    after = lora_projections(x, qkv)
    after_mlp = lora_gated_mlp(x, *mlp)
    torch.testing.assert_close(after[0], before[0])  # q's weights did not change
    for i in (1, 2):
        assert rel_err(after[i], reference(x, qkv[i])) < BF16, rng_seed
        assert rel_err(after[i], before[i].double()) > 0.1, "the output must follow the changed weight"
    assert rel_err(after_mlp, mlp_reference(x, *mlp)) < BF16, rng_seed
    assert rel_err(after_mlp, before_mlp.double()) > 0.1


class _RawWrite(torch.optim.Optimizer):
    """Writes the parameters behind autograd's back, like bitsandbytes' 8-bit optimizers (CUDA
    code on the raw pointer): the version counter does not move."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda ps: _RawWrite(ps, lr=0.5), lambda ps: torch.optim.AdamW(ps, lr=0.5, fused=True)],
    ids=["raw-write", "fused-adamw"],
)
def test_optimizer_step_refreshes_the_copies(make_optimizer, rng_seed, monkeypatch):
    """After a step the outputs are bit for bit those of casting the new weights at every use (a
    float64 reference would only bound bf16 rounding, which a large step makes seed-dependent)."""
    qkv, mlp = qkv_and_mlp()
    params = [t for p in qkv + mlp for t in (p.lora_a, p.lora_b)]
    opt = make_optimizer(params)
    x = torch.randn(2, 5, 32, device=DEVICE).bfloat16()
    before = [*lora_projections(x, qkv), lora_gated_mlp(x, *mlp)]
    torch.autograd.backward(before, [torch.randn_like(o) for o in before])
    versions = [p._version for p in params]
    opt.step()
    if isinstance(opt, _RawWrite):
        assert [p._version for p in params] == versions, "this optimizer must bypass the version counter"
    with torch.no_grad():
        outs = [*lora_projections(x, qkv), lora_gated_mlp(x, *mlp)]
        monkeypatch.setattr(adapter_copies, "ENABLED", False)
        cast = [*lora_projections(x, qkv), lora_gated_mlp(x, *mlp)]
    for o, c, b in zip(outs, cast, before):
        torch.testing.assert_close(o, c, rtol=0, atol=0, msg=lambda m: f"seed {rng_seed}: {m}")
        assert rel_err(o, b.detach().double()) > 1e-3, "the output must follow the step"


def _layer(x, qkv, mlp):
    """Forward and backward of one layer's fused LoRA ops; (outputs, x grad, adapter grads)."""
    x = x.detach().requires_grad_()
    for p in qkv + mlp:
        p.lora_a.grad = p.lora_b.grad = None
    outs = [*lora_projections(x, qkv), *lora_projections(x, qkv[:1]), lora_gated_mlp(x, *mlp)]
    torch.manual_seed(7)
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    return outs, x.grad, [t.grad for p in qkv + mlp for t in (p.lora_a, p.lora_b)]


def test_copies_equal_casting_at_every_use(monkeypatch):
    """The cached copies are the casts the uncached path makes: bit for bit the same outputs and
    gradients; gradients in the parameters' dtype."""
    qkv, mlp = qkv_and_mlp()
    x = torch.randn(2, 5, 32, device=DEVICE).bfloat16()
    cached = _layer(x, qkv, mlp)
    monkeypatch.setattr(adapter_copies, "ENABLED", False)
    cast = _layer(x, qkv, mlp)
    for got, want in zip([*cached[0], cached[1], *cached[2]], [*cast[0], cast[1], *cast[2]]):
        assert torch.equal(got, want)
    assert all(g.dtype == torch.float32 for g in cached[2])


def _count(fn, op: str) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == op)


def test_one_batched_refresh_per_change():
    """No cast while nothing changes; after an optimizer step, one _foreach_copy_ refreshes every
    adapter of the layer (q/k/v, o, gate/up, down) at the first use, and none after it."""
    gc.collect()  # copies of an earlier test's models, still in a reference cycle, would be refreshed too
    qkv, mlp = qkv_and_mlp()
    x = torch.randn(2, 5, 32, device=DEVICE).bfloat16()
    opt = torch.optim.SGD([t for p in qkv + mlp for t in (p.lora_a, p.lora_b)], lr=0.1)
    _layer(x, qkv, mlp)
    assert _count(lambda: _layer(x, qkv, mlp), "aten::_foreach_copy_") == 0
    opt.step()
    assert _count(lambda: _layer(x, qkv, mlp), "aten::_foreach_copy_") == 1


@pytest.mark.parametrize("checkpoint", [None, "forward"])
def test_a_groups_backward_takes_its_forwards_copies(checkpoint, monkeypatch):
    """One lookup of the copies per group and pass, forward and backward together (each is ~10 µs of the host's
    time, which paces short steps): q/k/v's, o's, and the gated MLP's two (gate/up's, down's)."""
    qkv, mlp = qkv_and_mlp()
    x = torch.randn(2, 5, 32, device=DEVICE).bfloat16().requires_grad_()
    groups = []
    lookup = adapter_copies.stacked
    monkeypatch.setattr(lora_products, "stacked", lambda g, *a, **k: groups.append(len(g)) or lookup(g, *a, **k))
    outs = [*lora_projections(x, qkv), *lora_projections(x, qkv[:1]), lora_gated_mlp(x, *mlp, checkpoint=checkpoint)]
    forward = list(groups)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    assert forward == [4, 2, 3, 2] and groups == forward  # [A's stacked, each s·B]: qkv, o, gate/up, down
    assert all(t.grad is not None for p in qkv + mlp for t in (p.lora_a, p.lora_b))


@pytest.mark.parametrize("dtype,bound,mlp_bound", [(torch.float64, 1e-12, 1e-6), (torch.float32, 1e-5, 1e-5)])
@pytest.mark.parametrize("scales", [(2.0, 2.0, 2.0), (2.0, 0.5, 1.25)], ids=["same-scales", "own-scales"])
def test_stacked_down_projections_match_separate_ones(dtype, bound, mlp_bound, scales, rng_seed):
    """q (32 out, rank 4), k and v (8 out, ranks 4 and 2, with bias), and gate/up/down, each
    against its own projection in float64: outputs, dx, dA, dB. (The SwiGLU kernel between gate/up
    and down computes in fp32 whatever its inputs: the MLP's bound in float64.)"""
    d = 24
    qkv = [
        projection(32, d, 4, scales[0], dtype, bias=True),
        projection(8, d, 4, scales[1], dtype, bias=True),
        projection(8, d, 2, scales[2], dtype, bias=True),
    ]
    mlp = [
        projection(40, d, 4, scales[0], dtype),
        projection(40, d, 3, scales[1], dtype),
        projection(d, 40, 4, scales[2], dtype),
    ]
    if dtype == torch.float64:
        for p in qkv + mlp:
            p.lora_a.data, p.lora_b.data = p.lora_a.data.double(), p.lora_b.data.double()
    x = torch.randn(3, 7, d, device=DEVICE, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    outs = [*lora_projections(x, qkv), lora_gated_mlp(x, *mlp)]
    grads = [torch.randn_like(o, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [g.to(dtype) for g in grads])
    fused = [t.grad.clone() for p in qkv + mlp for t in (p.lora_a, p.lora_b)]
    for p in qkv + mlp:
        p.lora_a.grad = p.lora_b.grad = None
    refs = [reference(x64, p) for p in qkv] + [mlp_reference(x64, *mlp)]
    torch.autograd.backward(refs, grads)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert rel_err(o, r) < (bound if i < 3 else mlp_bound), rng_seed
    assert rel_err(x.grad, x64.grad) < mlp_bound, rng_seed
    for i, (got, param) in enumerate(zip(fused, [t for p in qkv + mlp for t in (p.lora_a, p.lora_b)])):
        assert got.dtype == param.dtype and rel_err(got, param.grad) < (bound if i < 6 else mlp_bound), rng_seed


def test_plain_projection_among_lora_ones(rng_seed):
    """A plain Linear between two LoRA projections of the same input: the stacked A holds only
    the LoRA ones, and each output and gradient is its own projection's."""
    d = 16
    plain = Projection(torch.randn(8, d, dtype=torch.float64, device=DEVICE), None, None, None, 0.0)
    made = [projection(12, d, 4, 2.0, torch.float64), plain, projection(8, d, 2, 0.5, torch.float64)]
    for p in (made[0], made[2]):
        p.lora_a.data, p.lora_b.data = p.lora_a.data.double(), p.lora_b.data.double()
    x = torch.randn(5, d, device=DEVICE, dtype=torch.float64, requires_grad=True)
    x64 = x.detach().clone().requires_grad_()
    outs = lora_projections(x, made)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    fused = [t.grad.clone() for p in (made[0], made[2]) for t in (p.lora_a, p.lora_b)]
    for p in (made[0], made[2]):
        p.lora_a.grad = p.lora_b.grad = None
    refs = [reference(x64, p) for p in made]
    torch.autograd.backward(refs, grads)
    for o, r in zip(outs, refs):
        assert rel_err(o, r) < 1e-12, rng_seed
    assert rel_err(x.grad, x64.grad) < 1e-12, rng_seed
    for got, t in zip(fused, [t for p in (made[0], made[2]) for t in (p.lora_a, p.lora_b)]):
        assert rel_err(got, t.grad) < 1e-12, rng_seed


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "cast-per-use"])
def test_scaled_copies_round_once_and_follow_their_scale(cached, monkeypatch):
    """A group's copy times its scale is the product in the weight's dtype rounded once to the compute dtype
    (not a rounded weight scaled and rounded again), refreshed after a step, and another scale of the same
    weight is another copy, not the first one's."""
    monkeypatch.setattr(adapter_copies, "ENABLED", cached)
    a = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    b = torch.randn(40, 4, device=DEVICE, requires_grad=True)
    scale = 0.3  # no power of two: s·bf16(B) rounded again differs from bf16(s·B)
    got_a, got_b = adapter_copies.stacked([[a], [b]], torch.bfloat16, [1.0, scale])
    assert torch.equal(got_a, a.detach().bfloat16())
    assert torch.equal(got_b, (b.detach() * scale).bfloat16())
    assert not torch.equal(got_b, (b.detach().bfloat16() * scale).bfloat16())
    (other,) = adapter_copies.stacked([[b]], torch.bfloat16, [2.5])
    assert torch.equal(other, (b.detach() * 2.5).bfloat16())
    b.grad = torch.ones_like(b)
    torch.optim.SGD([b], lr=1.0).step()
    (after,) = adapter_copies.stacked([[b]], torch.bfloat16, [scale])
    assert torch.equal(after, (b.detach() * scale).bfloat16())


def test_copies_of_dead_weights_are_dropped():
    qkv, mlp = qkv_and_mlp()
    x = torch.randn(4, 32, device=DEVICE).bfloat16()
    gc.collect()
    before = len(adapter_copies._CACHE)
    _layer(x, qkv, mlp)
    assert len(adapter_copies._CACHE) == before + 4  # q/k/v, q alone, gate/up, down
    del qkv, mlp
    gc.collect()
    assert len(adapter_copies._CACHE) == before


def test_under_torch_distributed_every_call_casts():
    """With a process group (FSDP2 re-gathers parameters behind the version counter) nothing is
    cached: even a write through .data reaches the next call."""
    import torch.distributed as dist

    qkv, _ = qkv_and_mlp()
    x = torch.randn(4, 32, device=DEVICE).bfloat16()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port to race for
    try:
        lora_projections(x, qkv)
        qkv[0].lora_a.data.add_(1.0)
        (q, _, _) = lora_projections(x, qkv)
        assert rel_err(q, reference(x, qkv[0])) < BF16
    finally:
        dist.destroy_process_group()


def test_a_refresh_plan_refreshes_its_copies_and_leaves_the_others_to_their_next_use(count_host_refreshes):
    """What a replayed optimizer step's graph holds (worker/train/graphed_update.py): the copies made only of the
    step's parameters, refreshed by `run()` (the graph's kernels) and marked fresh without a host refresh; a copy
    that also reads a tensor outside the step, or one made after the plan, is refreshed at its next use."""
    gc.collect()
    params = [torch.nn.Parameter(torch.full((2, 4), 1.0, device=DEVICE)) for _ in range(2)]
    frozen = torch.full((3, 4), 5.0, device=DEVICE)
    ours = adapter_copies.stacked([params], torch.bfloat16, scales=[2.0])[0]
    mixed = adapter_copies.stacked([[params[0], frozen]], torch.bfloat16)[0]
    plan = adapter_copies.RefreshPlan(params)
    assert len(plan) == 2
    for p in params:
        p.data.add_(1.0)  # as the graph's optimizer kernels write: through the storage
    torch.autograd.graph.increment_version(params)  # what a replay says of them
    plan.run()
    plan.mark_fresh()
    refreshes = count_host_refreshes()
    assert torch.equal(
        adapter_copies.stacked([params], torch.bfloat16, scales=[2.0])[0],
        torch.full((4, 4), 4.0, device=DEVICE, dtype=torch.bfloat16),
    )
    assert refreshes == []  # the plan's copies were current: no host refresh
    assert adapter_copies.stacked([params], torch.bfloat16, scales=[2.0])[0] is ours
    fresh = adapter_copies.stacked([[params[0], frozen]], torch.bfloat16)[0]
    assert fresh is mixed and refreshes == [1]
    assert torch.equal(fresh[:2], torch.full((2, 4), 2.0, device=DEVICE, dtype=torch.bfloat16))
    later = adapter_copies.stacked([params[1:]], torch.bfloat16)[0]  # made after the plan: not in it
    before = len(refreshes)
    params[1].data.add_(1.0)
    torch.autograd.graph.increment_version(params)
    plan.run()
    plan.mark_fresh()
    again = adapter_copies.stacked([params[1:]], torch.bfloat16)[0]
    assert again is later and len(refreshes) == before + 1
    assert torch.equal(again, torch.full((2, 4), 3.0, device=DEVICE, dtype=torch.bfloat16))


def test_a_refresh_plan_leaves_a_copy_whose_weight_moved_to_its_next_use():
    """A parameter given new storage after the plan: the graph still copies the old one, so the copy is not marked."""
    gc.collect()
    params = [torch.nn.Parameter(torch.ones(2, 4, device=DEVICE))]
    adapter_copies.stacked([params], torch.bfloat16)
    plan = adapter_copies.RefreshPlan(params)
    params[0].data = torch.full((2, 4), 7.0, device=DEVICE)
    plan.mark_fresh()  # after a replay whose kernels copied the old storage (eagerly, run() would read the new one)
    assert torch.equal(
        adapter_copies.stacked([params], torch.bfloat16)[0],
        torch.full((2, 4), 7.0, device=DEVICE, dtype=torch.bfloat16),
    )

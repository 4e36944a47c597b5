"""The ScatterMoE LoRA experts kernel against transformers' eager experts, in float64.

The reference is transformers' own Qwen3MoeExperts forward (the per-expert loop) over W + s·B·A
built in float64 by autograd; the kernel runs in float32 (under Triton's interpreter on CPU).
Routings cover the cases a grouped GEMM gets wrong: experts with no tokens, one token, tied
router scores, and loads so uneven that one expert spans several row blocks while others get one row.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E, HIDDEN, INTER, RANK = 6, 32, 24, 4
# both implementations of the experts function; grouped_mm's float32 runs on CPU (on CUDA it is
# bf16-only: tests/kernels/test_gpu.py checks it there against the Triton one)
GEMMS = pytest.mark.parametrize(
    "gemm", ["triton", pytest.param("grouped_mm", marks=pytest.mark.skipif(DEVICE == "cuda", reason="bf16 only"))]
)


def eager_experts():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    return Qwen3MoeExperts(cfg).double()


def routing(case: str, tokens: int, k: int = 2):
    if case == "random":
        scores = torch.randn(tokens, E).softmax(-1)
    elif case == "ties":  # every score equal: topk's own tie-break decides, the kernel must follow the ids
        scores = torch.full((tokens, E), 1.0 / E)
    elif case == "uneven":  # experts 0 and 3 get everything, the others nothing
        scores = torch.rand(tokens, E) * 0.01
        scores[:, 0] += 1.0
        scores[:, 3] += 0.5
    else:
        raise ValueError(case)
    weights, index = torch.topk(scores, k, dim=-1)
    return weights, index


def run_case(case: str, tokens: int, gemm: str, dtype=torch.float32):
    from ftw_kernels.moe import scattermoe_lora

    weights, index = routing(case, tokens)
    w_gu, w_d = torch.randn(E, 2 * INTER, HIDDEN) * 0.2, torch.randn(E, HIDDEN, INTER) * 0.2
    factors = [
        torch.randn(E, RANK, HIDDEN) * 0.3,
        torch.randn(E, 2 * INTER, RANK) * 0.3,
        torch.randn(E, RANK, INTER) * 0.3,
        torch.randn(E, HIDDEN, RANK) * 0.3,
    ]
    s_gu, s_d = 0.5, 2.0
    x = torch.randn(tokens, HIDDEN)

    ours = [t.to(DEVICE, dtype, copy=True).requires_grad_() for t in [x, *factors]]
    y = scattermoe_lora(
        ours[0],
        index.to(DEVICE),
        weights.to(DEVICE, dtype),
        w_gu.to(DEVICE, dtype),
        w_d.to(DEVICE, dtype),
        ((ours[1], ours[2], s_gu), (ours[3], ours[4], s_d)),
        gemm,
    )
    dy = torch.randn(tokens, HIDDEN, dtype=torch.float64)
    y.backward(dy.to(DEVICE, dtype))

    ref = [t.double().requires_grad_() for t in [x, *factors]]
    experts = eager_experts()
    with torch.nn.utils.parametrize.cached():
        del experts.gate_up_proj, experts.down_proj  # plain tensors W + s·B·A, so autograd reaches A and B
        experts.gate_up_proj = w_gu.double() + s_gu * ref[2] @ ref[1]
        experts.down_proj = w_d.double() + s_d * ref[4] @ ref[3]
        y_ref = experts(ref[0], index, weights.double())
    y_ref.backward(dy)
    return y, y_ref, ours, ref


@GEMMS
@pytest.mark.parametrize("case, tokens", [("random", 9), ("ties", 5), ("uneven", 40), ("random", 1)])
def test_forward_and_every_gradient_match_eager_experts(case, tokens, gemm, rng_seed):
    y, y_ref, ours, ref = run_case(case, tokens, gemm)
    assert rel_err(y, y_ref) < 1e-5, rng_seed
    for name, a, b in zip(["x", "A_gate_up", "B_gate_up", "A_down", "B_down"], ours, ref):
        assert a.grad is not None and rel_err(a.grad, b.grad) < 1e-5, (name, rng_seed)


@GEMMS
def test_experts_with_no_tokens_get_zero_gradients(gemm, rng_seed):
    _, _, ours, _ = run_case("uneven", 12, gemm)
    idle = [e for e in range(E) if e not in (0, 3)]
    for grad in (ours[1].grad, ours[2].grad, ours[3].grad, ours[4].grad):
        assert torch.count_nonzero(grad[idle]) == 0
        assert torch.count_nonzero(grad[[0, 3]]) > 0


@GEMMS
def test_base_weights_alone_without_lora(gemm, rng_seed):
    from ftw_kernels.moe import scattermoe_lora

    weights, index = routing("random", 6)
    experts = eager_experts()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(6, HIDDEN, dtype=torch.float64)
    xs = x.float().to(DEVICE).requires_grad_()
    y = scattermoe_lora(
        xs,
        index.to(DEVICE),
        weights.float().to(DEVICE),
        experts.gate_up_proj.detach().float().to(DEVICE),
        experts.down_proj.detach().float().to(DEVICE),
        gemm_name=gemm,
    )
    x64 = x.clone().requires_grad_()
    y_ref = experts(x64, index, weights.double())
    dy = torch.randn_like(y_ref)
    y.backward(dy.float().to(DEVICE))
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(xs.grad, x64.grad) < 1e-5, rng_seed


def test_gemm_choice_grouped_on_a_gpu_that_runs_it_triton_elsewhere_and_the_variable_forces_either(monkeypatch):
    """The experts' default GEMMs: torch's grouped GEMM on a GPU whose operands it takes (measured
    faster on the H200: docs/benchmarks.md), the Triton kernels on CPU and where it does not run."""
    from ftw_kernels import moe, moe_grouped

    w_gu, w_d = torch.empty(4, 64, 32), torch.empty(4, 32, 32)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(moe.GEMM_ENV, raising=False)
    monkeypatch.setattr(moe_grouped, "usable", lambda device, dtype, dims: True)
    assert moe.gemm(gpu, torch.bfloat16, w_gu, w_d, 16) == "grouped_mm"
    assert moe.gemm(cpu, torch.bfloat16, w_gu, w_d, 16) == "triton"
    monkeypatch.setenv(moe.GEMM_ENV, "triton")
    assert moe.gemm(gpu, torch.bfloat16, w_gu, w_d, 16) == "triton"
    monkeypatch.setenv(moe.GEMM_ENV, "grouped_mm")
    assert moe.gemm(cpu, torch.bfloat16, w_gu, w_d, 16) == "grouped_mm"
    monkeypatch.setattr(moe_grouped, "usable", lambda device, dtype, dims: False)
    monkeypatch.delenv(moe.GEMM_ENV)
    assert moe.gemm(gpu, torch.float16, w_gu, w_d, 16) == "triton"
    monkeypatch.setenv(moe.GEMM_ENV, "cutlass")
    with pytest.raises(ValueError, match="FTW_MOE_GEMM='cutlass'"):
        moe.gemm(gpu, torch.bfloat16, w_gu, w_d, 16)

"""ScatterMoE-style experts with LoRA fused in: ftw's experts implementation for transformers.

transformers 5 dispatches every `@use_experts_implementation` experts module (Qwen3-MoE, OLMoE,
Mixtral, ...) through `ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`. `register()` adds
`scattermoe_experts_forward` there under NAME; `kernels/ftw_kernels/registry.py` switches a model to it.

Two implementations of the same function, `gemm` picks one per call (FTW_MOE_GEMM forces it):
`grouped_mm` (kernels/ftw_kernels/moe_grouped.py: torch's grouped GEMM for the base products, the
LoRA term as rank-r grouped GEMMs beside it; a GPU's default where its operands allow) and `triton`,
this file's fused kernels:

Per layer: tokens are sorted by expert (`Routing`), gate_up runs as one grouped GEMM that reads
the tokens in place, adds s·(x Aₑᵀ) Bₑᵀ from the same K loop and applies SwiGLU in its epilogue;
down runs as a second one whose output rows land in routing order; the routing weights and the
sum over top-k are plain tensor ops (autograd gives the router its gradient). The backward
recomputes h from the saved pre-activations, writes dgate/dup over them, and gets dx and the four
LoRA gradients from the same two kernels (with transposed weight views) and `grouped_tn`.

The LoRA factors come from PEFT's ParamWrappers around the experts module (LoRA through
`target_parameters`): `kernels/ftw_kernels/patches.py` records them on the module (`_ftw_expert_lora`) and
makes the wrappers call the module directly, so PEFT's W + BA is never formed. Anything the
kernel does not model (trainable W, biases, transposed or interleaved layouts, a custom gate,
merged or several adapters, no Triton device) runs transformers' `grouped_mm` instead.
"""

from __future__ import annotations

import os

import torch

from ftw_kernels import moe_grouped
from ftw_kernels.moe_gemm import INTERPRETED, Routing, grouped_tn, in_compute_dtype, scatter_mm
from ftw_kernels.moe_swiglu import swiglu_rows_backward
from ftw_kernels.precision import compute_dtype, no_autocast

NAME = "scattermoe"
GEMM_ENV = "FTW_MOE_GEMM"  # unset: grouped_mm on a GPU where it runs, else triton; "triton" | "grouped_mm" force one
GEMMS = ("triton", "grouped_mm")


class ScatterMoELoRA(torch.autograd.Function):
    """y (routing order: token·k + j, unweighted) = down(silu(gate)·up) of each routed token."""

    @staticmethod
    def forward(ctx, x, top_k_index, w_gu, w_d, scales, a_gu, b_gu, a_d, b_d):
        x, w_gu, w_d, (a_gu, b_gu, a_d, b_d) = in_compute_dtype(ctx, x, w_gu, w_d, (a_gu, b_gu, a_d, b_d))
        lora = a_gu is not None
        with no_autocast(x):
            routing = Routing(top_k_index, w_gu.shape[0])
            inter = w_d.shape[2]
            gu = x.new_empty(routing.rows, 2 * inter)
            h = x.new_empty(routing.rows, inter)
            xa_gu = x.new_empty(routing.rows, a_gu.shape[1]) if lora else None
            scatter_mm(
                x, w_gu, routing, gu, a=a_gu, b=b_gu, scale=scales[0], x_index=routing.token, xa_out=xa_gu, h_out=h
            )
            y = x.new_empty(routing.rows, w_d.shape[1])
            xa_d = x.new_empty(routing.rows, a_d.shape[1]) if lora else None
            scatter_mm(h, w_d, routing, y, a=a_d, b=b_d, scale=scales[1], y_index=routing.perm, xa_out=xa_d)
        ctx.save_for_backward(x, w_gu, w_d, gu, xa_gu, xa_d, a_gu, b_gu, a_d, b_d)
        ctx.routing, ctx.scales = routing, scales
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gu, w_d, gu, xa_gu, xa_d, a_gu, b_gu, a_d, b_d = ctx.saved_tensors
        routing, (s_gu, s_d) = ctx.routing, ctx.scales
        lora = a_gu is not None
        dy = dy.to(x.dtype).contiguous()
        dh, dyb = _input_grad(dy, w_d, a_d, b_d, s_d, routing, x_index=routing.perm)  # down
        h = swiglu_rows_backward(dh, gu, want_h=lora)  # gu now holds [dgate | dup]
        del dh
        grads = [None] * 4
        if lora:
            grads[2] = grouped_tn(dyb, h, routing, x.new_empty(a_d.shape), scale=s_d)  # dA_down
            grads[3] = grouped_tn(dy, xa_d, routing, x.new_empty(b_d.shape), scale=s_d, l_index=routing.perm)  # dB_down
        del h
        dx = None
        if ctx.needs_input_grad[0] or lora:
            dx_rows, dgub = _input_grad(gu, w_gu, a_gu, b_gu, s_gu, routing, y_index=routing.perm)  # gate_up
            dx = dx_rows.view(-1, routing.top_k, x.shape[1]).sum(1) if ctx.needs_input_grad[0] else None
            if lora:
                grads[0] = grouped_tn(
                    dgub, x, routing, x.new_empty(a_gu.shape), scale=s_gu, r_index=routing.token
                )  # dA_gate_up
                grads[1] = grouped_tn(gu, xa_gu, routing, x.new_empty(b_gu.shape), scale=s_gu)  # dB_gate_up
        if dx is not None:
            dx = dx.to(ctx.x_dtype)
        grads = [g.to(ctx.lora_dtype) if g is not None else None for g in grads]
        return dx, None, None, None, None, *grads


def _input_grad(dy, w, a, b, scale, routing, **index) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx = dy W + s·(dy B) A of one grouped LoRA linear (W (E, out, in), A (E, r, in), B (E, out, r)):
    the forward kernel over Wᵀ, with Bᵀ in A's place and Aᵀ in B's. Also dy B (for dA), with LoRA."""
    lora = a is not None
    dx = dy.new_empty(dy.shape[0], w.shape[2])
    dyb = dy.new_empty(dy.shape[0], a.shape[1]) if lora else None
    scatter_mm(
        dy,
        w.transpose(1, 2),
        routing,
        dx,
        a=b.transpose(1, 2) if lora else None,
        b=a.transpose(1, 2) if lora else None,
        scale=scale,
        xa_out=dyb,
        **index,
    )
    return dx, dyb


def gemm(device: torch.device, dtype: torch.dtype, w_gu, w_d, rank: int | None) -> str:
    """The GEMMs that run experts of these weights computing in `dtype`: "grouped_mm" or "triton".
    On a GPU, torch's grouped GEMM wherever its operands allow (bf16 on Hopper/Blackwell, dimensions
    multiples of 8): on the H200 it ran OLMoE at 4 × 2048 tokens 1.62× and Qwen3-30B-A3B at 2 × 2048
    1.50× the fused Triton kernels' speed (bench/moe.py; docs/benchmarks.md). The Triton kernels
    elsewhere (on CPU: interpreted, as the tests run them); FTW_MOE_GEMM forces either."""
    choice = os.environ.get(GEMM_ENV) or ("grouped_mm" if device.type == "cuda" else "triton")
    if choice not in GEMMS:
        raise ValueError(f"{GEMM_ENV}={choice!r}: expected one of {', '.join(GEMMS)}")
    if choice == "triton":
        return "triton"
    dims = (w_gu.shape[1], w_gu.shape[2], w_d.shape[2], *([rank] if rank else []))
    return "grouped_mm" if moe_grouped.usable(device, dtype, dims) else "triton"


def scattermoe_lora(x, top_k_index, top_k_weights, w_gu, w_d, lora=None, gemm_name: str = "triton") -> torch.Tensor:
    """The experts' output for `x` (tokens × hidden); `lora`: ((A, B, s) of gate_up, (A, B, s) of
    down) with A (E, r, in), B (E, out, r), or None for the base weights alone; `gemm_name`: the
    GEMMs that run it (`gemm`)."""
    (a_gu, b_gu, s_gu), (a_d, b_d, s_d) = lora if lora is not None else ((None, None, 0.0), (None, None, 0.0))
    function = moe_grouped.GroupedMoELoRA if gemm_name == "grouped_mm" else ScatterMoELoRA
    y = function.apply(x, top_k_index, w_gu, w_d, (s_gu, s_d), a_gu, b_gu, a_d, b_d)
    tokens, k = top_k_index.shape
    # Σⱼ wⱼ·yⱼ per token as one batched (1 × k)(k × hidden) product: y is read once each way, no
    # weighted copy (autograd gives the router weights their gradient from the same y)
    out = torch.bmm(top_k_weights.to(y.dtype).unsqueeze(1), y.view(tokens, k, -1))
    return out.squeeze(1).to(x.dtype)


# ---- the experts implementation -----------------------------------------------------------------
def experts_modules(model) -> list[torch.nn.Module]:
    """Modules under transformers' `@use_experts_implementation` (3-D expert tensors)."""
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_concatenated")]


def _peft_factors(wrapper) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (E, r, in), B (E, out, r), scale) of a PEFT ParamWrapper over a (E, out, in) parameter,
    as views of its lora_A / lora_B weights (autograd maps the gradients back)."""
    name = wrapper.active_adapters[0]
    a = wrapper.lora_A[name].weight
    b = wrapper.lora_B[name].weight
    experts = wrapper.num_experts
    return (
        a.view(experts, -1, a.shape[-1]),
        b.view(b.shape[0], -1, experts).permute(2, 0, 1),
        float(wrapper.scaling[name]),
    )


def wrapper_fusable(wrapper) -> bool:
    """One active adapter, not merged, adapters enabled: the state the fused kernel reproduces."""
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    return (
        len(active) == 1 and not wrapper.merged and not wrapper.disable_adapters and wrapper._did_swap_in_out_features
    )


def expert_lora(module) -> tuple | None | bool:
    """The module's LoRA factors; None: no LoRA on it; False: LoRA in a state the kernel does not fuse."""
    wrappers = getattr(module, "_ftw_expert_lora", None)
    if not wrappers:
        return None
    if set(wrappers) != {"gate_up_proj", "down_proj"} or not all(wrapper_fusable(w) for w in wrappers.values()):
        return False
    return _peft_factors(wrappers["gate_up_proj"]), _peft_factors(wrappers["down_proj"])


def module_fusable(module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    w = getattr(module, "gate_up_proj", None)
    return (
        getattr(module, "has_gate", False)
        and not getattr(module, "has_bias", True)
        and not getattr(module, "is_transposed", True)
        and getattr(module, "is_concatenated", False)
        and type(module)._apply_gate is _default_apply_gate
        and type(getattr(module, "act_fn", None)).__name__ == "SiLUActivation"
        and isinstance(w, torch.nn.Parameter)
        and not w.requires_grad
        and not module.down_proj.requires_grad
        and not torch.nn.utils.parametrize.is_parametrized(module)
        and (w.is_cuda or INTERPRETED)
    )


def scattermoe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts-forward signature: (tokens × hidden, tokens × k ids, tokens × k weights)."""
    lora = expert_lora(self)
    if lora is False or not module_fusable(self):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    w_gu, w_d = self.gate_up_proj, self.down_proj
    rank = lora[0][0].shape[1] if lora is not None else None
    gemm_name = gemm(hidden_states.device, compute_dtype(hidden_states), w_gu, w_d, rank)
    return scattermoe_lora(hidden_states, top_k_index, top_k_weights, w_gu, w_d, lora, gemm_name)


def register() -> None:
    """Add NAME to transformers' experts registry (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, scattermoe_experts_forward)

"""The patched forwards for the decoder families of `kernels/ftw_kernels/registry.py`, and their installer.

Each forward reproduces the transformers 5.17 forward of its module with the kernels swapped in,
and hands anything it does not cover (a KV cache, eval-time logits, an adapter state the fused
LoRA functions do not model) back to the module's original forward. The causal LM's training forward (the fused
loss head) is in kernels/ftw_kernels/causal_lm.py.
"""

from __future__ import annotations

import logging
import sys

import torch

import ftw_kernels.attention as attention
import ftw_kernels.base_weight as base_weight
import ftw_kernels.bordered as bordered
import ftw_kernels.causal_lm as causal_lm
import ftw_kernels.fp8 as fp8
import ftw_kernels.moe as moe
from ftw_kernels.forwards import replace_forward
from ftw_kernels.lora import Projection, lora_gated_mlp, lora_projections, projection_of, shared_dropout
from ftw_kernels.precision import in_backward
from ftw_kernels.rmsnorm import rms_norm_and_residual, rmsnorm_forward
from ftw_kernels.rope import apply_rope
from ftw_kernels.swiglu import swiglu_mlp_forward

log = logging.getLogger("ftw.kernels")


def varlen_available() -> bool:
    return attention.varlen_attn_fn() is not None


# ---- MLP --------------------------------------------------------------------------------------
def _mlp_fusable(projections: list[Projection | None]) -> bool:
    return all(p is not None and p.bias is None and p.lora_a is not None for p in projections) and (
        shared_dropout(projections[:2]) is not None  # type: ignore[arg-type]  # gate and up: one input, one mask
    )


def _lora_mlp_forward(
    self, x: torch.Tensor, residual: torch.Tensor | None = None, checkpoint: str | None = None
) -> torch.Tensor:
    """The MLP of x, or residual + it (a patched decoder layer's stream, added inside the fused down projection);
    `checkpoint`: the pass of a checkpointed layer (`lora_gated_mlp`)."""
    projections = [projection_of(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    if not _mlp_fusable(projections):
        out = swiglu_mlp_forward(self, x)
        return out if residual is None else residual + out
    return lora_gated_mlp(x, *projections, residual=residual, checkpoint=checkpoint)


# ---- attention --------------------------------------------------------------------------------
def _projections(modules, fused: bool) -> list[Projection] | None:
    if not fused:
        return None
    found = [projection_of(m) for m in modules]
    if not all(p is not None and p.lora_a is not None for p in found):
        return None
    return found if shared_dropout(found) is not None else None  # type: ignore[arg-type]


def _attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    if past_key_values is not None:
        return self._ftw_original_forward(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
    bsz, seq, _ = hidden_states.shape
    qkv = _projections((self.q_proj, self.k_proj, self.v_proj), self._ftw_fuse_qkv)
    if qkv is not None:
        q, k, v = lora_projections(hidden_states, qkv)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    if self._ftw_qk_norm == "projection":
        q, k = self.q_norm(q), self.k_norm(k)
    clip = getattr(self.config, "clip_qkv", None)  # OLMoE
    if clip is not None:
        q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    q, k, v = (t.view(bsz, seq, -1, self.head_dim) for t in (q, k, v))
    if self._ftw_qk_norm == "head":
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    modeling = sys.modules[type(self).__module__]
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    window = getattr(self.config if self._ftw_window_in_config else self, "sliding_window", None)
    if window is not None:
        kwargs["sliding_window"] = window
    out, weights = interface(
        self,
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **kwargs,
    )
    out = out.reshape(bsz, seq, -1)
    o = _projections((self.o_proj,), self._ftw_fuse_o)
    out = lora_projections(out, o)[0] if o is not None else self.o_proj(out)
    return out, weights


# ---- decoder layer ----------------------------------------------------------------------------
def _decoder_layer_forward(
    self,
    hidden_states,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    use_cache=False,
    position_embeddings=None,
    **kwargs,
):
    """A pre-norm decoder layer whose residual stream costs no pass of its own: the attention's add is written by
    the post-attention norm's kernel beside its output, the MLP's rides the fused down projection's GEMMs (with the
    fused LoRA MLP), and the grads the stream brings back are added inside both norms' backward
    (kernels/ftw_kernels/rmsnorm.py `rms_norm_and_residual`) instead of by autograd in kernels of their own. The
    same sums as transformers' `residual + block(norm(x))`."""
    if past_key_values is not None:
        return self._ftw_original_forward(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    normed, residual = rms_norm_and_residual(self.input_layernorm, hidden_states)
    attended, _ = self.self_attn(
        hidden_states=normed,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    normed, residual = rms_norm_and_residual(self.post_attention_layernorm, residual, attended)
    if _patched(self.mlp, _lora_mlp_forward):
        return self.mlp(normed, residual, checkpoint=_checkpoint_pass(self))
    return residual + self.mlp(normed)


def _checkpoint_pass(layer) -> str | None:
    """Which pass of its own checkpoint runs the layer (transformers checkpoints each decoder layer; ftw checkpoints
    nothing around them): "recompute" when autograd's backward runs it again, "forward" the first time, None when
    it is not checkpointed. A recompute's output is only the root its backward starts from (reentrant) or thrown
    away (non-reentrant): its values are never read. Under torch.compile the compiler partitions the recompute
    itself, and reading autograd's state would break its graph."""
    if torch.compiler.is_compiling() or not (getattr(layer, "gradient_checkpointing", False) and layer.training):
        return None
    return "recompute" if torch.is_grad_enabled() and in_backward() else "forward"


def _patched(module, fn) -> bool:
    return getattr(getattr(module, "forward", None), "__func__", None) is fn


def _residual_foldable(layer, family) -> bool:
    """A decoder layer of the family's pre-norm shape (its norms carry ftw's forward, its MLP is the dense one)."""
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return (
        all(type(n).__name__ == family.norm_class and _patched(n, rmsnorm_forward) for n in norms)
        and hasattr(layer, "self_attn")
        and type(getattr(layer, "mlp", None)).__name__ == family.mlp_class
    )


# ---- MoE experts ------------------------------------------------------------------------------
def _experts_wrapper_forward(self, x, *args, **kwargs):
    """Outermost PEFT ParamWrapper over an experts module: call the module itself, whose experts
    function (kernels/ftw_kernels/moe.py) reads the LoRA factors, instead of PEFT's W + BA parametrization."""
    experts = self._ftw_experts
    if moe.expert_lora(experts) is False or experts.config._experts_implementation != moe.NAME:
        return self._ftw_original_forward(x, *args, **kwargs)
    return experts(x, *args, **kwargs)


def install_experts(model: torch.nn.Module) -> list[str]:
    """Switch every experts module of `model` (a PeftModel or plain model) to ftw's ScatterMoE
    experts; the LoRA that PEFT put on their tensors is fused in. [] when it has no experts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    experts = moe.experts_modules(base)
    if not experts:
        return []
    moe.register()
    base.set_experts_implementation(moe.NAME)
    wrappers = [m for m in base.modules() if type(m).__name__ == "ParamWrapper"]
    inner = {id(w.base_layer) for w in wrappers}
    fused = 0
    for module in experts:
        own = [w for w in wrappers if w.get_base_layer() is module]
        if not own:
            continue
        module._ftw_expert_lora = {w.parameter_name: w for w in own}
        for outer in (w for w in own if id(w) not in inner):
            outer._ftw_experts = module
            replace_forward(outer, _experts_wrapper_forward)
        fused += moe.expert_lora(module) not in (None, False)
    if not moe.module_fusable(experts[0]):  # e.g. GPT-OSS's biased, transposed experts; full fine-tuning
        log.info(
            "kernels: %s experts are not a layout the ScatterMoE kernel covers: grouped_mm serves them",
            type(experts[0]).__name__,
        )
        return []
    first = experts[0]
    lora = moe.expert_lora(first)
    rank = lora[0][0].shape[1] if lora else None
    gemm = moe.gemm(first.gate_up_proj.device, first.gate_up_proj.dtype, first.gate_up_proj, first.down_proj, rank)
    name = "scattermoe" if gemm == "triton" else "grouped_mm"  # the GEMMs at the weights' dtype (moe.gemm)
    return [f"{name}_lora" if fused else name]


# ---- FP8 base weights -------------------------------------------------------------------------
def _fp8_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A frozen Linear over a float8 weight, through the fused function (a LoRA wrapper above it adds its term)."""
    return lora_projections(x, [Projection(self.weight, self.bias, None, None, 0.0)])[0]


def install_fp8_base(base: torch.nn.Module, family) -> int:
    """Every frozen Linear of the attention and MLP modules as float8 (kernels/ftw_kernels/fp8.py), or, over a 4-bit
    base (QLoRA), its matmuls in float8 (base_weight.mark_fp8_matmuls); each one's forward through the fused
    function, which the fused LoRA projections call too; returns how many."""
    if next(base.parameters()).is_cuda and torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY:
        raise RuntimeError(
            f"fp8_base_weights needs a GPU of compute capability 8.9 or more (Ada, Hopper), this one has "
            f"{'.'.join(map(str, torch.cuda.get_device_capability()))}: remove fp8_base_weights"
        )
    converted = 0
    for module in base.modules():
        if type(module).__name__ not in (family.attention_class, family.mlp_class):
            continue
        for linear in module.modules():
            if fp8.convertible(linear):
                fp8.convert(linear)
            elif not base_weight.mark_fp8_matmuls(linear):
                continue
            replace_forward(linear, _fp8_linear_forward)
            converted += 1
    return converted


# ---- bordered weights (kernels/ftw_kernels/bordered.py) ----------------------------------------
def _plain_frozen(weight) -> bool:
    """A frozen floating-point weight that owns its memory: re-laid, its old storage is freed (one inside a
    larger buffer, e.g. a fused checkpoint's, would stay and the border would cost a second copy)."""
    return (
        type(weight) is torch.nn.Parameter
        and weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and not weight.requires_grad
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    )


def _border_group(modules) -> int:
    """Border one input's LoRA projections (their weights plain, frozen, of one dtype); returns the room their
    input needs (Σr, aligned), 0 where they are not bordered."""
    found = [projection_of(m) for m in modules]
    if any(p is None or p.lora_a is None or not _plain_frozen(p.weight) for p in found):
        return 0
    if len({p.weight.dtype for p in found}) != 1:  # type: ignore[union-attr]
        return 0
    return bordered.border_group([p.weight for p in found], [p.lora_a.shape[0] for p in found])  # type: ignore


def border_layers(base: torch.nn.Module) -> list[str]:
    """Border every decoder layer's fused q, k, v and gate, up groups and give the norm before each its room
    (after `apply_family`); returns `bordered_qkv` / `bordered_mlp` for what it did."""
    done = set()
    for layer in base.modules():
        norm, attn = getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None)
        if norm is not None and getattr(attn, "_ftw_fuse_qkv", False):
            room = _border_group([attn.q_proj, attn.k_proj, attn.v_proj])  # type: ignore[union-attr]
            if room:
                setattr(norm, bordered.ROOM, room)
                done.add("bordered_qkv")
        norm, mlp = getattr(layer, "post_attention_layernorm", None), getattr(layer, "mlp", None)
        if norm is not None and _patched(mlp, _lora_mlp_forward):
            room = _border_group([mlp.gate_proj, mlp.up_proj])  # type: ignore[union-attr]
            if room:
                setattr(norm, bordered.ROOM, room)
                done.add("bordered_mlp")
    return [name for name in ("bordered_qkv", "bordered_mlp") if name in done]


# ---- installer --------------------------------------------------------------------------------
def apply_family(base: torch.nn.Module, family, wanted: dict[str, bool]) -> list[str]:
    """Install every patch of `family` on `base` (a *ForCausalLM); return the names applied."""
    applied: list[str] = []
    by_class: dict[str, list[torch.nn.Module]] = {}
    for module in base.modules():
        by_class.setdefault(type(module).__name__, []).append(module)

    norms = by_class.get(family.norm_class, [])
    for m in norms:
        replace_forward(m, rmsnorm_forward)
    if norms:
        applied.append("rmsnorm")

    mlps = by_class.get(family.mlp_class, []) if family.mlp_class else []
    for m in mlps:
        replace_forward(m, _lora_mlp_forward if wanted["lora_mlp"] else swiglu_mlp_forward)
    if mlps:
        fused = wanted["lora_mlp"] and _mlp_fusable(
            [projection_of(x) for x in (mlps[0].gate_proj, mlps[0].up_proj, mlps[0].down_proj)]
        )
        applied.append("lora_mlp" if fused else "swiglu")

    attns = by_class.get(family.attention_class, [])
    for m in attns:
        m._ftw_fuse_qkv, m._ftw_fuse_o = wanted["lora_qkv"], wanted["lora_o"]
        m._ftw_qk_norm, m._ftw_window_in_config = family.qk_norm, family.window_in_config
        replace_forward(m, _attention_forward)
    if attns:
        first = attns[0]
        applied.append("rope")
        if _projections((first.q_proj, first.k_proj, first.v_proj), wanted["lora_qkv"]):
            applied.append("lora_qkv")
        if _projections((first.o_proj,), wanted["lora_o"]):
            applied.append("lora_o")

    layers = [m for m in by_class.get(family.decoder_class or "", []) if _residual_foldable(m, family)]
    for m in layers:
        replace_forward(m, _decoder_layer_forward)
    if layers:
        applied.append("residual_fold")

    if wanted["varlen_attention"]:
        attention.register()
        base.set_attn_implementation(attention.NAME)
        applied.append("varlen_attention")

    if causal_lm.plain_output_layer(getattr(base, "lm_head", None)) and hasattr(base, "model"):
        replace_forward(base, causal_lm.causal_lm_forward)
        applied.append("fused_linear_cross_entropy")
    return applied

"""The rotary angles as an exact float32 product, where fp32 matmuls may run in TF32.

transformers' standard rotary forward computes its angles as a batched matmul of the inverse frequencies
(d/2 × 1) and the position ids (1 × T) inside `autocast(enabled=False)`. That keeps the dtype float32, not the
matmul's precision: with TF32 allowed (ftw's `tf32: auto` on Ampere and later, axolotl's `tf32: true`,
`torch.set_float32_matmul_precision("high")`) cuBLAS may feed that GEMM through TF32's 10-bit mantissa, which holds
the integers exactly only up to 2048. Positions past it then round (2049 → 2048), and so do the angles, whose
error grows with the position (transformers issue 48428, seen on B200). The forward here computes the same outer
product elementwise (an fp32 multiply, no GEMM), which equals the matmul of one term bit for bit when no TF32 is
involved, and then the same cos and sin (over half the width: the two halves are the same numbers).

Installed on the instances whose rotary module's forward is one of transformers' standard ones (compared by
code, not by class name: 80-odd model classes share them); any other rotary module is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ftw_kernels.forwards import replace_forward

log = logging.getLogger("ftw.kernels")


def _code(fn: Any) -> tuple:
    """What identifies a forward's computation: its bytecode, constants and names, under its decorators."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    code = fn.__code__
    return code.co_code, code.co_consts, code.co_names


def _standard_forwards() -> set[tuple]:
    """The two spellings of the standard rotary forward in transformers 5.17 (Llama's; Qwen3's, with extra
    `.float()` casts): every module whose forward is one of them computes cos and sin the same way."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return {_code(LlamaRotaryEmbedding.forward), _code(Qwen3RotaryEmbedding.forward)}


def _exact_forward():
    """The rotary forward with its angles multiplied elementwise, decorated as transformers decorates its own
    (`dynamic_rope_update` refreshes inv_freq first for the dynamic and longrope types)."""
    from transformers.modeling_rope_utils import dynamic_rope_update

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() != 2:  # not (batch, seq): transformers' own forward, and its own error
            return self._ftw_original_forward(x, position_ids)
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        angles = position_ids[..., None].float() * inv_freq  # (batch, seq, head_dim / 2), each an exact product
        halves = []
        for half in (angles.cos(), angles.sin()):
            if self.attention_scaling != 1.0:
                half = half * self.attention_scaling
            half = half.to(x.dtype)
            halves.append(torch.cat((half, half), dim=-1))
        return halves[0], halves[1]

    return forward


def fp32_matmuls_may_use_tf32() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def install(model: torch.nn.Module) -> list[str]:
    """["rope_angles"] when any rotary module of `model` now computes exact angles, else []; a warning names the
    rotary modules whose forward is not a standard one (their angles stay transformers')."""
    standard, forward, patched, left = _standard_forwards(), None, 0, set()
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        if _code(type(module).forward) not in standard:
            left.add(type(module).__name__)
            continue
        forward = forward or _exact_forward()
        replace_forward(module, forward)
        patched += 1
    if left:
        log.warning(
            "fp32 matmuls may run in TF32 and %s keep transformers' rotary forward: their angles past position 2048 "
            "may round (tf32: false avoids it)",
            ", ".join(sorted(left)),
        )
    return ["rope_angles"] if patched else []

"""LoRA over a bitsandbytes 8-bit base (`load_in_8bit`) through the fused functions (kernels/ftw_kernels/qlora.py):
each int8 weight is dequantised per matmul as bitsandbytes dequantises it (its CPU backend quantises here). The
loss and every adapter grad are those of the same PEFT model over the dequantised weights in floating point, with
and without checkpointing, and the loss is close to PEFT's own 8-bit layers' (LLM.int8 also quantises the
activations); autograd never keeps a dequantised weight."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from ftw_kernels import apply_kernels  # noqa: E402
from ftw_kernels.qlora import dense, is_8bit  # noqa: E402
from schemas.config import TrainingConfig  # noqa: E402
from tests.kernels.conftest import rel_err  # noqa: E402
from tests.kernels.test_apply_kernels import (  # noqa: E402
    assert_matches_reference,
    loss_and_grads,
    packed_batch,
)
from tests.kernels.test_qlora import tiny_qlora  # noqa: E402

FUSED = ["lora_mlp", "lora_qkv", "lora_o", "dequant_8bit"]


def dequantised(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with each 8-bit base layer replaced by a floating-point Linear of its dequantised weight."""
    model = copy.deepcopy(model)
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and is_8bit(base.weight):
            linear = torch.nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device)
            linear.weight.data = dense(base.weight, torch.float32).clone()  # out of the cache of recent weights
            linear.weight.requires_grad_(False)
            module.base_layer = linear
    return model


def int8_config(**kw: object) -> TrainingConfig:
    base = {"base_model": "tiny", "learning_rate": 1e-3, "adapter": "lora", "load_in_8bit": True, "use_kernels": True}
    return TrainingConfig.model_validate({**base, **kw})


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_fused_lora_over_an_8bit_base_is_lora_over_its_dequantised_weights(checkpointing: bool) -> None:
    peft_int8 = tiny_qlora(checkpointing=checkpointing, bits=8)
    reference = dequantised(peft_int8)
    model = copy.deepcopy(peft_int8)
    assert set(FUSED) <= set(apply_kernels(model, int8_config(gradient_checkpointing=checkpointing)))
    batch = packed_batch()
    assert len(assert_matches_reference(reference, model, batch)) == 2 * 7 * 2  # A and B of 7 modules × 2 layers
    loss, _ = loss_and_grads(model, batch)
    int8_loss, _ = loss_and_grads(peft_int8, batch)  # LLM.int8's forward: the activations quantised too
    assert rel_err(loss, int8_loss) < 2e-2


def test_no_dequantised_8bit_weight_is_kept_for_backward() -> None:
    model = tiny_qlora(bits=8)
    apply_kernels(model, int8_config())
    dense_shapes = {tuple(p.shape) for p in model.parameters() if is_8bit(p)}
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**packed_batch()).loss  # 20 tokens: no activation has a weight's shape
    loss.backward()
    assert saved and not [t.shape for t in saved if tuple(t.shape) in dense_shapes and t.is_floating_point()]

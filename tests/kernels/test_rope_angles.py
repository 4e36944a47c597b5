"""The rotary angles where fp32 matmuls may run in TF32 (kernels/ftw_kernels/rope_angles.py): transformers' own
forward computes them as a GEMM, whose inputs TF32 rounds to a 10-bit mantissa; ftw's equals it bit for bit
without TF32 and stays exact with it. The CPU has no TF32, so a dispatch mode does to fp32 GEMMs' inputs what
tensor cores do."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from ftw_kernels import apply_kernels, rope_angles
from tests.kernels.test_apply_kernels import tiny, training_config

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


def tf32(t: torch.Tensor) -> torch.Tensor:
    """t with each fp32 value's mantissa cut to TF32's 10 bits."""
    return (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


class TensorCores(TorchDispatchMode):
    """fp32 GEMMs with their inputs rounded to TF32, as cuBLAS may run them when TF32 is allowed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            args = tuple(tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_allowed():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def positions(batch: int = 2, length: int = 4096) -> torch.Tensor:
    return torch.arange(length).repeat(batch, 1)


def rotary(cls, **rope):
    config_cls = Qwen3Config if cls is Qwen3RotaryEmbedding else LlamaConfig
    config = config_cls(
        hidden_size=256,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, **rope},
    )
    return cls(config)


def angles(module, dtype=torch.float32, pos=None):
    x = torch.zeros(1, dtype=dtype)
    return module(x, positions() if pos is None else pos)


def test_tf32_rounds_transformers_angles_and_not_ftws(tf32_allowed):
    """TF32 rounds the inverse frequencies (relative error up to 2⁻¹⁰, times the position) and, past 2048, the
    positions: with Llama 3's rope_theta transformers' cos moves by tenths within the first 2048 positions and by
    whole units past them. The model's rotary module, once the registry has run, gives the exact angles under the
    same rounding."""
    stock = rotary(LlamaRotaryEmbedding)
    exact = angles(stock)  # no TF32 on the CPU: the GEMM is exact here
    with TensorCores():
        rounded = angles(stock)
    error = (rounded[0] - exact[0]).abs()
    assert error[:, :2048].max() > 0.1 and error[:, 2048:].max() > 1.0  # what TF32 does to the stock forward

    model = tiny(LlamaConfig, max_position_embeddings=8192)
    module = model.get_base_model().model.rotary_emb
    exact = angles(module)
    assert "rope_angles" in apply_kernels(model, training_config(use_kernels=False))  # whatever use_kernels says
    with TensorCores():
        mended = angles(module)
    assert torch.equal(mended[0], exact[0]) and torch.equal(mended[1], exact[1])


@pytest.mark.parametrize("cls", [LlamaRotaryEmbedding, Qwen3RotaryEmbedding], ids=["llama", "qwen3"])
@pytest.mark.parametrize(
    "rope",
    [
        {},
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},  # attention_scaling ≠ 1
        {"rope_type": "dynamic", "factor": 2.0},  # inv_freq grows with the positions past 2048
    ],
    ids=["default", "linear", "llama3", "yarn", "dynamic"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_exact_angles_are_transformers_own_without_tf32(cls, rope, dtype):
    """Both spellings of the standard forward, every rope type they serve, both outputs' dtypes: bit for bit."""
    stock, mended = rotary(cls, **rope), rotary(cls, **rope)
    assert rope_angles.install(mended) == ["rope_angles"]
    for pos in (positions(length=1024), positions(), torch.tensor([[0, 1, 2, 0, 1, 3000, 3001, 7]])):
        want, got = angles(stock, dtype, pos), angles(mended, dtype, pos)
        assert got[0].dtype == dtype and got[0].shape == want[0].shape
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(stock.inv_freq, mended.inv_freq)  # the dynamic type updated both alike


def test_position_ids_of_another_rank_get_transformers_forward():
    stock, mended = rotary(LlamaRotaryEmbedding), rotary(LlamaRotaryEmbedding)
    rope_angles.install(mended)
    rope_angles.install(mended)  # twice, as a model patched again would be
    pos = torch.arange(8)
    with pytest.raises(IndexError) as want:
        angles(stock, pos=pos)
    with pytest.raises(IndexError) as got:
        angles(mended, pos=pos)
    assert str(got.value) == str(want.value)


def test_other_rotary_forwards_are_left_and_named(caplog):
    """Gemma 3's forward takes a layer type (local and global layers' own frequencies): not a standard one."""
    gemma3 = Gemma3RotaryEmbedding(Gemma3TextConfig(hidden_size=64, num_attention_heads=2, head_dim=32))
    with caplog.at_level(logging.WARNING, logger="ftw.kernels"):
        assert rope_angles.install(gemma3) == []
    assert "forward" not in vars(gemma3) and "Gemma3RotaryEmbedding" in caplog.text


def test_nothing_changes_while_fp32_matmuls_are_exact():
    assert torch.get_float32_matmul_precision() == "highest"
    model = tiny(LlamaConfig)
    assert apply_kernels(model, training_config(use_kernels=False)) == []
    assert "forward" not in vars(model.get_base_model().model.rotary_emb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device's own TF32 GEMMs")
def test_on_the_device_under_tf32_the_angles_are_the_exact_ones(tf32_allowed):
    """On a GPU with TF32 allowed, ftw's cos is float64's cos of the fp32 angles (each an exact product, rounded
    once) to a few units of fp32's last place; transformers' own (printed) show whether this GPU's cuBLAS rounds
    that GEMM's inputs."""
    stock, mended = rotary(LlamaRotaryEmbedding), rotary(LlamaRotaryEmbedding)
    rope_angles.install(mended)
    pos = positions()
    exact = (pos[..., None].float() * stock.inv_freq.float()).double().cos()  # IEEE products: the device's own
    errors = {}
    for name, module in (("transformers", stock), ("ftw", mended)):
        cos = module.cuda()(torch.zeros(1, device="cuda"), pos.cuda())[0][..., : exact.shape[-1]]
        errors[name] = (cos.cpu().double() - exact).abs().max().item()
    print(f"cos off the exact angles' by up to: {errors}")
    assert errors["ftw"] < 1e-6

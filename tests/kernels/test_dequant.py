"""The Triton 4-bit dequantisation (kernels/ftw_kernels/dequant.py) against bitsandbytes' own on the same
`Params4bit`, and QLoRA's cache of recent weights (kernels/ftw_kernels/qlora.py): what it keeps, what it
evicts, and how many times a training step dequantises each weight with and without checkpointing.

On CPU the kernel runs under Triton's interpreter, which truncates float32 → bfloat16 where a GPU rounds to
nearest even: bf16 outputs are bit-equal on CUDA and within one bf16 step here; fp32 and fp16 are bit-equal
on both."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes.functional import dequantize_4bit  # noqa: E402

import ftw_kernels.dequant as dequant  # noqa: E402
from ftw_kernels import apply_kernels, qlora  # noqa: E402
from tests.kernels.test_apply_kernels import DEVICE, loss_and_grads, packed_batch  # noqa: E402
from tests.kernels.test_qlora import qlora_config, tiny_qlora  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def quantised(rows: int, cols: int, dtype: torch.dtype, **kw: object) -> torch.Tensor:
    weight = torch.randn(rows, cols, dtype=dtype) * 0.02
    return bnb.nn.Params4bit(weight, requires_grad=False, **kw).to(DEVICE)  # .to quantises


def assert_same_values(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":  # the interpreter truncates: one bf16 step
        step = ref.float().abs() * 2.0**-7
        assert ((out.float() - ref.float()).abs() <= step).all()
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8-storage", "bf16-storage"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_equals_bitsandbytes(quant_type: str, nested: bool, storage: torch.dtype, dtype: torch.dtype) -> None:
    """3,000 bytes: two full programs and a partial one; 47 blocks of 64, the last absmax₂ block partial."""
    weight = quantised(48, 125, dtype, quant_type=quant_type, compress_statistics=nested, quant_storage=storage)
    assert dequant.supported(weight)
    ref = dequantize_4bit(weight, weight.quant_state)
    out = torch.full(weight.quant_state.shape, float("nan"), dtype=dtype, device=DEVICE)
    assert_same_values(dequant.dequantize_4bit(weight, out), ref)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_kernel_follows_the_blocksize(blocksize: int) -> None:
    weight = quantised(64, 256, torch.float32, quant_type="nf4", compress_statistics=True, blocksize=blocksize)
    out = torch.empty(weight.quant_state.shape, device=DEVICE)
    assert torch.equal(dequant.dequantize_4bit(weight, out), dequantize_4bit(weight, weight.quant_state))


def test_dense_casts_what_is_not_4bit() -> None:
    plain = torch.randn(3, 4)
    assert qlora.dense(plain, torch.bfloat16).dtype == torch.bfloat16 and qlora.dense_bytes(plain) == 0


def test_kernel_refuses_an_output_of_another_size() -> None:
    weight = quantised(8, 16, torch.float32)
    with pytest.raises(ValueError, match="128 values"):
        dequant.dequantize_4bit(weight, torch.empty(8, 15, device=DEVICE))


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Kernel launches per weight (by id), through `qlora.dense`."""
    counts: Counter = Counter()
    real = dequant.dequantize_4bit

    def counted(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        counts[id(weight)] += 1
        return real(weight, out)

    monkeypatch.setattr(dequant, "dequantize_4bit", counted)
    yield counts
    qlora.keep_recent(0)


def test_dense_keeps_recent_weights_within_its_bound(launches: Counter) -> None:
    weights = [quantised(32, 64, torch.float32, quant_type="nf4") for _ in range(3)]
    each = qlora.dense_bytes(weights[0])
    assert each == 32 * 64 * 4
    qlora.keep_recent(2 * each)
    refs = [dequantize_4bit(w, w.quant_state) for w in weights]
    for w, ref in zip(weights, refs):
        assert torch.equal(qlora.dense(w, torch.float32), ref)
    recent = qlora._RECENT[(weights[0].device, torch.float32)]
    assert recent.held == 2 * each and len(recent.entries) == 2
    assert torch.equal(qlora.dense(weights[2], torch.float32), refs[2])  # kept: no launch
    assert torch.equal(qlora.dense(weights[0], torch.float32), refs[0])  # evicted first: dequantised again
    assert [launches[id(w)] for w in weights] == [2, 1, 1]
    assert torch.equal(qlora.dense(weights[1], torch.float32), refs[1])  # 1 was the oldest once 0 came back
    assert launches[id(weights[1])] == 2 and recent.held == 2 * each
    assert qlora.dequantisations() == 5  # what the benches report


def test_dense_with_no_room_keeps_only_the_last_weight(launches: Counter) -> None:
    qlora.keep_recent(0)
    a, b = (quantised(16, 32, torch.float32) for _ in range(2))
    qlora.dense(a, torch.float32)
    qlora.dense(a, torch.float32)
    qlora.dense(b, torch.float32)
    qlora.dense(a, torch.float32)
    assert (launches[id(a)], launches[id(b)]) == (2, 1)
    assert qlora._RECENT[(a.device, torch.float32)].held == qlora.dense_bytes(a)


def step_launches(checkpointing: bool, launches: Counter, hold_a_layer: bool = True) -> tuple[list[int], list[int]]:
    """Dequantisations per 4-bit weight in one forward and backward of a 2-layer QLoRA model: (layer 0's, layer 1's)."""
    model = tiny_qlora(checkpointing=checkpointing)
    apply_kernels(model, qlora_config(gradient_checkpointing=checkpointing))
    if not hold_a_layer:
        qlora.keep_recent(0)
    layers = model.get_base_model().model.layers
    loss_and_grads(model, packed_batch())
    per_layer = [[launches[id(p)] for p in layer.parameters() if qlora.is_4bit(p)] for layer in layers]
    assert [len(w) for w in per_layer] == [7, 7]
    return per_layer[0], per_layer[1]


def test_apply_kernels_holds_one_decoder_layer() -> None:
    model = tiny_qlora()
    apply_kernels(model, qlora_config())
    layer = model.get_base_model().model.layers[0]
    expected = sum(qlora.dense_bytes(p) for p in layer.parameters())
    assert expected == 4 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128)  # q, o; k, v; gate, up, down in fp32
    assert qlora._CAPACITY == expected


@pytest.mark.parametrize(
    "checkpointing,first_layer",
    [(True, [2] * 7), (False, [1, 1, 1, 2, 2, 2, 2])],
    ids=["ckpt", "no-ckpt"],
)
def test_a_step_dequantises_each_weight_at_most_twice(
    checkpointing: bool, first_layer: list[int], launches: Counter
) -> None:
    """Checkpointing recomputes a layer's forward just before its backward, which then finds all seven weights in
    the cache: two dequantisations per weight, not three. The last layer's backward (and its recomputed forward)
    follows its forward at once: one. Without checkpointing the first layer's input (the frozen embedding) wants
    no gradient, so q, k and v need no backward matmul there."""
    first, last = step_launches(checkpointing, launches)
    assert first == first_layer and last == [1] * 7


def test_without_a_layer_of_room_checkpointing_dequantises_three_times(launches: Counter) -> None:
    """The cache is what saves the third dequantisation: bounded to one weight, the backward misses."""
    first, _ = step_launches(True, launches, hold_a_layer=False)
    assert sum(first) > 2 * 7 and max(first) == 3

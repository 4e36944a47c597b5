"""LoRA's forward as one GEMM per projection over a bordered weight: y = x·Wᵀ + (x·Aᵀ)·(s·B)ᵀ = [x | x·Aᵀ]·[W | s·B]ᵀ.

The fused projections (kernels/ftw_kernels/lora.py) otherwise write each rank-r term as a tokens × out output
and let the base GEMM add itself to it (cuBLAS's beta): one more write and read of every output. Here:
- each frozen weight of one input's projections (q, k, v; gate, up) is re-laid in place as [W | 0 … 0 | s·B]
  in a buffer of its own: the parameter object stays, W becomes a strided view of the buffer's first columns,
  and its s·B slot (filled by `ftw_kernels.adapter_copies` once per optimizer step, as the copy it makes of B
  anyway) lies after the zeros that stand for the projections before it in the group;
- the norm before the group (`input_layernorm`, `post_attention_layernorm`) writes its output rows with Σr spare
  columns beside them (`with_room`), and marks the output with how many (`ROOM`);
- the forward writes x·[A₁;…;Aₙ]ᵀ into those columns, and each projection is one GEMM over the prefix
  [x | x·A₁ᵀ … x·Aᵢᵀ] of that buffer: no rank-r output is written and read again, and x is never copied.
The backward is unchanged: W and s·B are strided views of the buffer, x and x·Aᵀ views of the norm's output.

Measured per projection group in isolation (bench/stacked_gemms.py, docs/benchmarks.md): 1.00–1.08× ftw's
forward at 8B and 1.00–1.15× at 1B; in the H200's training step, under the allocator setting every ftw stage runs
with (expandable segments), +0.3% at 8B and +0.8% at 1B for 0.7 and 0.2 GiB more reserved at the same allocated
peak. On by default; `FTW_BORDERED_LORA=0` switches it off (bench/train_throughput.py's arm `ftw-unbordered`). The
registry installs it (kernels/ftw_kernels/patches.py `border_layers`) only over plain frozen weights in one process: not
over 4-bit or float8 ones, not with lora_dropout (the rank-r terms read the dropped input), not under DeepSpeed, FSDP
or torch_compile.
"""

from __future__ import annotations

import os

import torch

ENV = "FTW_BORDERED_LORA"  # "0": the registry leaves the fused LoRA groups' weights as they are
ROOM = "ftw_room"  # on a norm module and on its output: the spare columns beside each output row
_BORDER = "ftw_border"  # on a re-laid weight: (its buffer, its s·B slot)
ALIGN = 8  # columns: rows of 16-byte multiples (bf16), as cuBLAS's tensor-core kernels want their strides


def wanted() -> bool:
    return os.environ.get(ENV, "1") != "0"


def with_room(n_rows: int, n_cols: int, room: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised n_rows × n_cols tensor whose rows have `room` spare columns after them."""
    return like.new_empty(n_rows, n_cols + room)[:, :n_cols] if room else like.new_empty(n_rows, n_cols)


def mark(y: torch.Tensor, room: int) -> torch.Tensor:
    if room:
        setattr(y, ROOM, room)
    return y


def room_of(x: torch.Tensor) -> int:
    """The spare columns a norm with room left beside `x`'s rows (0 for any other tensor: its neighbouring
    columns, if any, may hold something else)."""
    return getattr(x, ROOM, 0)


def widened(x2: torch.Tensor, room: int, needed: int) -> torch.Tensor | None:
    """x2 (the rows of a tensor with `room` spare columns) as [x2 | its room], the room's columns past the first
    `needed` zeroed (the bordered weights' padding multiplies them); None when the room is too small or the
    layout is not the norm's."""
    if needed == 0 or room < needed or x2.stride(1) != 1 or x2.stride(0) != x2.shape[1] + room:
        return None
    # through `.data`: the room lies outside every tensor autograd tracks, so writing it must not count as an
    # in-place change of the norm's output (autograd refuses any later use of a custom Function's view output
    # whose base changed)
    wide = x2.data.as_strided((x2.shape[0], x2.shape[1] + room), (x2.stride(0), 1), x2.storage_offset())
    if room > needed:
        wide[:, x2.shape[1] + needed :].zero_()
    return wide


def joined(x2: torch.Tensor, xa: torch.Tensor | None) -> torch.Tensor | None:
    """The rows of x2 with all their room, as one dense tensor, when `xa` was written into that room (`widened`);
    None otherwise. Saved for the backward instead of x2 and xa: activation offloading copies dense tensors."""
    if xa is None or xa.stride() != x2.stride() or xa.data_ptr() != x2.data_ptr() + x2.shape[1] * x2.element_size():
        return None
    return x2.data.as_strided((x2.shape[0], x2.stride(0)), (x2.stride(0), 1), x2.storage_offset())


def split(whole: torch.Tensor, cols: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x2, xa) out of what `joined` made of them."""
    return whole[:, :cols], whole[:, cols : cols + rank]


def border_of(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the buffer [W | 0 … s·B], the s·B slot) of a re-laid weight; None for any other, or for one whose data
    was replaced since (`.data =`, a move to another device)."""
    found = getattr(weight, _BORDER, None)
    if found is None:
        return None
    buffer, _ = found
    if weight.data_ptr() != buffer.data_ptr() or weight.stride() != (buffer.stride(0), 1):
        return None
    return found


def border_group(weights: list[torch.Tensor], ranks: list[int]) -> int:
    """Re-lay the frozen weights of one input's projections in place, each as [W | 0 … 0 | slot | 0 …] with its
    slot of rᵢ columns after Σⱼ₍<ᵢ₎ rⱼ zero ones; returns the room its input needs, Σr rounded up to `ALIGN`."""
    offset = 0
    for weight, rank in zip(weights, ranks):
        out, inp = weight.shape
        buffer = weight.new_zeros(out, inp + _aligned(offset + rank))
        buffer[:, :inp].copy_(weight.detach())
        weight.data = buffer[:, :inp]
        setattr(weight, _BORDER, (buffer, buffer[:, inp + offset : inp + offset + rank]))
        offset += rank
    return _aligned(offset)


def _aligned(columns: int) -> int:
    return -(-columns // ALIGN) * ALIGN

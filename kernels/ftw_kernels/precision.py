"""What a fused op reads of the state it runs under. The dtype it computes in: autocast's when it is on (as the
unfused ops would), else its input's. The autograd functions switch autocast off inside and cast explicitly, so an
fp32-weight model under fp16/bf16 autocast (full fine-tuning with fp16) gets matching dtypes. And whether autograd's
backward is running: a forward run there is a checkpointed layer's recompute. And whether Triton runs its kernels
through the interpreter (the CPU tests): tiles and paths are chosen for it there."""

from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def in_backward() -> bool:
    graph_task = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside autograd's backward
    return graph_task is not None and graph_task() != -1

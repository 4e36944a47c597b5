"""Each MoE block (router + experts) of a training model replayed as a pair of CUDA graphs.

Why: a MoE layer is many small launches (routing, the grouped GEMMs and their LoRA terms, SwiGLU,
the weighted sum), and at a few thousand tokens a step the host's launch rate, not the GPU, sets the
pace: bench/moe.py --profile on the H200 read a Qwen3-30B-A3B step (12 layers, 2 × 2048 tokens) at
127 ms of wall time for 80 ms of GPU work. Replaying each block's forward and backward as one graph
each halves the host's ops and makes that step GPU-bound (docs/benchmarks.md, "MoE LoRA training step").

How: every block's first training call runs eagerly and records its input (shape, dtype,
requires_grad, autocast). The first block's next such call captures all blocks at once with
`torch.cuda.make_graphed_callables` (one memory pool; forwards in layer order, backwards in
reverse, as PyTorch documents for partial-network capture). From then on a block replays its graphs
when the call is one they reproduce and runs eagerly otherwise: without grad (evaluation,
generation), in eval mode, with its adapters disabled, merged or switched (DPO's reference pass),
under another autocast, or for another shape. A packed micro-batch a little shorter than the
captured one (at least FILL of its tokens) is padded with zero rows: a zero row adds nothing to any
gradient (its LoRA products, its SwiGLU output and its upstream gradient are all zero).

The registry installs this only where a replay is the same computation: CUDA, one process, no
gradient checkpointing (its recompute would replay a forward inside the backward), no router aux
loss (transformers reads the router's logits through hooks that a replay does not run), no
torch_compile, no DeepSpeed or FSDP (their hooks move parameters around each module's call).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("ftw.kernels")

FILL = 0.9  # a shorter input replays (padded) when it has at least this share of the captured tokens


@dataclass(frozen=True)
class Signature:
    """What a captured graph reproduces: its input's layout and the autocast it ran under."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    autocast: tuple[bool, torch.dtype]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, torch.get_autocast_dtype(device_type) if enabled else torch.float32


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks of a (PEFT-wrapped) transformers model, in layer order: a module with
    an `experts` child and a router child (`gate` or `router`)."""
    return [m for m in model.modules() if "experts" in m._modules and ("gate" in m._modules or "router" in m._modules)]


class MoEBlockGraphs:
    """The graphs of one model's MoE blocks and the dispatch between them and the eager forward.

    `capture_shape`: the (rows, tokens) a micro-batch is padded up to when it fits (packed training:
    micro_batch_size × sequence_len), or None to capture the first shape seen. `make_graphs` and
    `device_type`: torch.cuda.make_graphed_callables on "cuda" (the CPU tests give another)."""

    def __init__(
        self,
        blocks: list[torch.nn.Module],
        capture_shape: tuple[int, int] | None = None,
        make_graphs: Callable = torch.cuda.make_graphed_callables,
        device_type: str = "cuda",
    ):
        self.blocks = blocks
        self.capture_shape = capture_shape
        self.make_graphs = make_graphs
        self.device_type = device_type
        self.signatures: dict[int, Signature] = {}
        self.graphed: list[Callable] | None = None
        self.adapters: list[tuple] | None = None  # each block's adapter state at capture
        self.failed = False
        self.capturing = False
        self.replays = 0  # calls served by a graph (what the tests read)
        self.tuners = [
            [m for m in b.modules() if hasattr(m, "disable_adapters") and hasattr(m, "merged")] for b in blocks
        ]
        self.eager = [b.forward for b in blocks]
        for i, block in enumerate(blocks):
            block.forward = self._dispatcher(i)

    def _dispatcher(self, i: int) -> Callable:
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            return self.forward(i, hidden_states)

        return forward

    def _adapter_state(self, i: int) -> tuple:
        return tuple((m.disable_adapters, m.merged, tuple(m.active_adapters)) for m in self.tuners[i])

    def _eligible(self, i: int, x: torch.Tensor) -> bool:
        """A call a graph can stand for: training with grad on the GPU, the adapters as captured."""
        if (
            self.capturing
            or self.failed
            or not (x.device.type == self.device_type and torch.is_grad_enabled() and self.blocks[i].training)
        ):
            return False
        state = self._adapter_state(i)
        if self.adapters is not None:
            return state == self.adapters[i]
        return not any(disabled or merged for disabled, merged, _ in state)

    def _signature(self, x: torch.Tensor) -> Signature:
        shape = tuple(x.shape)
        if self.capture_shape is not None and x.dim() == 3:
            rows, tokens = self.capture_shape
            if x.shape[0] <= rows and x.shape[1] <= tokens:
                shape = (rows, tokens, x.shape[2])
        return Signature(shape, x.dtype, x.requires_grad, _autocast_state(x.device.type))

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if not self._eligible(i, x):
            return self.eager[i](x)
        signature = self._signature(x)
        if self.graphed is None:
            if i not in self.signatures:  # the first training call: eager, and what to capture
                self.signatures[i] = signature
                return self.eager[i](x)
            ready = i == 0 and len(self.signatures) == len(self.blocks) and self.signatures[0] == signature
            if not (ready and self._capture()):
                return self.eager[i](x)
        if signature != self.signatures[i]:
            return self.eager[i](x)
        target = signature.shape
        if tuple(x.shape) == target:
            self.replays += 1
            return self.graphed[i](x)
        if x.shape[0] * x.shape[1] < FILL * target[0] * target[1]:
            return self.eager[i](x)
        padded = torch.nn.functional.pad(x, (0, 0, 0, target[1] - x.shape[1], 0, target[0] - x.shape[0]))
        self.replays += 1
        return self.graphed[i](padded)[: x.shape[0], : x.shape[1]]

    def _capture(self) -> bool:
        """All blocks' graphs, or (on any error) eager from now on, with the reason logged."""
        signatures = [self.signatures[i] for i in range(len(self.blocks))]
        device = next(p.device for p in self.blocks[0].parameters())
        enabled, dtype = signatures[0].autocast
        samples = tuple(
            (torch.randn(s.shape, dtype=s.dtype, device=device).requires_grad_(s.requires_grad),) for s in signatures
        )
        self.capturing = True
        try:
            with torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
                # allow_unused_input: a trainable parameter no call reaches gets no grad, not an error
                self.make_graphs(tuple(self.blocks), samples, allow_unused_input=True)
            self.graphed = [b.forward for b in self.blocks]  # what make_graphed_callables put there
            self.adapters = [self._adapter_state(i) for i in range(len(self.blocks))]
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager path, which is correct
            self.failed = True
            log.warning("kernels: MoE blocks run eagerly: capturing them as CUDA graphs failed (%s)", e)
        finally:
            self.capturing = False
            for i, block in enumerate(self.blocks):
                block.forward = self._dispatcher(i)
        if self.graphed is not None:
            log.info("kernels: %d MoE blocks captured as CUDA graphs at %s", len(self.blocks), signatures[0].shape)
        return self.graphed is not None


def install(model: torch.nn.Module, capture_shape: tuple[int, int] | None) -> MoEBlockGraphs | None:
    """Graph dispatch on every MoE block of `model` (None when it has none)."""
    blocks = moe_blocks(model)
    if not blocks:
        return None
    graphs = MoEBlockGraphs(blocks, capture_shape)
    model._ftw_moe_graphs = graphs  # kept with the model (tests and the log read it)
    return graphs

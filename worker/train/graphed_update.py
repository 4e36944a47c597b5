"""Clipping and the optimizer's step replayed as one CUDA graph.

Why: a LoRA model's update touches hundreds of small tensors, and on a short step the host's Python work to
launch it (the norm of each gradient, fused AdamW's grouping and checks: ~3.5 ms of a ~110 ms 1B step on a slow
host, sampled with bench/host_samples.py) is time the GPU waits. Captured once, the update costs the host one
copy of the gradients into fixed buffers, a fill of the learning rate and one replay.

When (`graph_blocker` says why not): one process on one CUDA device, torch's fused Adam or AdamW, no fp16 loss
scaler, trainable tensors of one dtype whose gradients fit GRAPH_BYTES (the fixed buffers are a second copy of
them). The run's first step runs eagerly (it creates the optimizer's state) and the graph is captured after it,
from that step's gradients' shapes. A step where a trainable tensor has no gradient (an expert no token reached),
or one after a schedule changed a setting other than the learning rate (OneCycle cycles Adam's betas), runs
eagerly, on the same state tensors. The learning rate the graph reads is a device tensor the host fills before
each replay: schedulers, checkpoints and the logged lr keep the float in `param_groups`. The fused kernel reads a
tensor rate as float32, so a replayed step uses the rate rounded to float32 (a relative 6e-8 at most) where the
eager step uses its double. A replay calls no `optimizer.step()`, so it runs no step hooks; it marks the parameters
changed instead (their version counters), which is what the caches of derived weights read. The bf16 adapter copies
the fused LoRA kernels read (ftw_kernels.adapter_copies) are refreshed inside the graph, after the step, and marked
fresh after each replay: the host launches none of their copies.
"""

from __future__ import annotations

import logging
import os

import torch

from ftw_kernels.adapter_copies import RefreshPlan
from worker.train.optim import clip_to_norm

log = logging.getLogger("ftw.train")

SWITCH = "FTW_GRAPHED_UPDATE"  # "0" in the worker's environment: every step's update runs eagerly (rules the graph out)
GRAPH_BYTES = 1 << 30  # gradients above this: the second copy costs more memory than the launches cost time
FUSED_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def graph_blocker(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], device: torch.device, world_size: int, scaler: bool
) -> str | None:
    """Why the clip and optimizer step cannot be one replayed graph in this run, or None when they can."""
    if os.environ.get(SWITCH) == "0":
        return f"{SWITCH}=0 in the environment"
    if device.type != "cuda":
        return f"the run is on {device.type}, not CUDA"
    if world_size > 1:
        return "several processes reduce their gradients between the backward and the step"
    if scaler:
        return "fp16's loss scaler reads each step's overflow check on the host"
    if type(optimizer) not in FUSED_ADAM or not all(group.get("fused") for group in optimizer.param_groups):
        return f"{type(optimizer).__name__} is not torch's fused Adam or AdamW"
    if any(isinstance(v, torch.Tensor) for group in optimizer.param_groups for k, v in group.items() if k != "params"):
        return "a setting of the optimizer is a tensor"
    if not params or any((p.device, p.dtype) != (params[0].device, params[0].dtype) for p in params):
        return "the trainable tensors are on several devices or in several dtypes"
    size = sum(p.numel() * p.element_size() for p in params)
    if size > GRAPH_BYTES:
        return f"the gradients take {size / 2**30:.1f} GiB, and the graph would keep a second copy"
    return None


class GraphedUpdate:
    """`replay()` runs a step's clip and optimizer step from the graph, or returns None when this step must run
    eagerly; `capture()`, after an eager step, records the graph from that step's gradients."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float):
        self.optimizer, self.params, self.max_norm = optimizer, params, max_norm
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tried = False  # one capture a run: a failed one is not retried
        self.grads: list[torch.Tensor] = []  # the graph's fixed inputs: each step's gradients are copied in
        self.lrs: list[torch.Tensor] = []  # each group's learning rate, read by the graph
        self.norm: torch.Tensor | None = None  # the graph's output: the gradients' total norm before clipping
        self.settings: list[dict] = []
        self.copies: RefreshPlan | None = None  # the adapter copies the graph refreshes after the step

    def _settings(self) -> list[dict]:
        return [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in self.optimizer.param_groups]

    def replay(self) -> torch.Tensor | None:
        """The total gradient norm (valid until the next replay; the caller copies it), or None: run this step
        eagerly."""
        if self.graph is None:
            return None
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads) or self._settings() != self.settings:
            return None
        torch._foreach_copy_(self.grads, grads)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])
        self.graph.replay()
        # the graph wrote the parameters through their pointers, which moves no version counter: without this, what
        # caches a parameter until it changes (the bf16 adapter copies, ftw_kernels.adapter_copies) would keep
        # serving the weights of the step before the first replay
        torch.autograd.graph.increment_version(self.params)
        if self.copies is not None:
            self.copies.mark_fresh()  # ...but the copies the graph refreshed are current
        return self.norm

    def capture(self) -> None:
        """Record the clip and the step once, after the run's first eager step (the optimizer's state exists).
        Nothing runs while a graph is captured: the parameters and the state are as the eager step left them."""
        grads = [p.grad for p in self.params]
        if self.tried or any(g is None for g in grads):
            return
        self.tried = True
        groups = self.optimizer.param_groups
        saved = [(group["lr"], group["capturable"]) for group in groups]
        try:  # the buffers too: a run that fits eagerly but not with a second copy of its gradients goes on eagerly
            self.grads = [torch.empty_like(g) for g in grads]
            self.lrs = [
                torch.tensor(float(group["lr"]), dtype=torch.float32, device=grads[0].device) for group in groups
            ]
            graph = torch.cuda.CUDAGraph()
            for p, g in zip(self.params, self.grads):
                p.grad = g
            for group, lr in zip(groups, self.lrs):
                group["lr"], group["capturable"] = lr, True  # the step reads its lr from the tensor
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.norm = clip_to_norm(self.grads, self.max_norm)
                self.optimizer.step()
                copies = RefreshPlan(self.params)
                copies.run()
        except RuntimeError as e:  # out of memory, or a step the graph cannot hold: every step stays eager
            log.warning("the optimizer step runs eagerly each step: capturing it as a CUDA graph failed (%s)", e)
            self.grads, self.lrs, self.norm = [], [], None
            return
        finally:
            for group, (lr, capturable) in zip(groups, saved):
                group["lr"], group["capturable"] = lr, capturable
            for p, g in zip(self.params, grads):
                p.grad = g
        self.graph, self.settings, self.copies = graph, self._settings(), copies
        log.info(
            "the clip, the optimizer step and %d adapter copies replay as one CUDA graph (%d tensors)",
            len(copies),
            len(self.params),
        )

"""One process per device: DDP, FSDP2 (`fully_shard`) for fsdp/fsdp_config, DeepSpeed ZeRO for deepspeed.

The child is started by torchrun (see `worker.train.launch`), which sets RANK/WORLD_SIZE; a
lone child runs without a process group. `deepspeed:` runs DeepSpeed's engine
(worker/train/deepspeed_engine.py); `deepspeed_as_fsdp: true` asks instead for the FSDP2
sharding that does the same thing (ZeRO-1/2: gradients and optimizer state sharded, parameters
kept whole after forward → `reshard_after_forward=False`; ZeRO-3: parameters sharded too →
`True`; `*_offload` → CPU offload). Never one for the other without the config saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from schemas.config import TrainingConfig

log = logging.getLogger("ftw.train")


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(cfg: TrainingConfig) -> Topology:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=cfg.ddp_timeout or 1800),
            device_id=device if device.type == "cuda" else None,
        )
    return Topology(int(os.environ.get("RANK", "0")), local_rank, world, device)


def barrier(topo: Topology) -> None:
    if topo.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def strategy(cfg: TrainingConfig, topo: Topology) -> dict:
    """{"kind": single|ddp|fsdp2|deepspeed, ...} from the config's keys."""
    if topo.world_size == 1:
        return {"kind": "single"}
    if cfg.deepspeed:
        from worker.train.deepspeed_engine import zero_section

        zero = zero_section(cfg)
        stage = int(zero.get("stage", 0))
        if not cfg.deepspeed_as_fsdp:
            return {"kind": "deepspeed", "stage": stage}
        offload = bool(zero.get("offload_param") or zero.get("offload_optimizer"))
        log.info("deepspeed ZeRO-%d runs as FSDP2 with the same sharding (deepspeed_as_fsdp: true)", stage)
        return {"kind": "fsdp2", "reshard": stage >= 3, "offload": offload}
    if cfg.fsdp or cfg.fsdp_config is not None:
        opts = cfg.fsdp_config.model_dump() if cfg.fsdp_config is not None else {}
        flags = cfg.fsdp if isinstance(cfg.fsdp, list) else (cfg.fsdp or "").split()
        reshard = opts.get(
            "reshard_after_forward", opts.get("fsdp_reshard_after_forward", "shard_grad_op" not in flags)
        )
        offload = bool(opts.get("offload_params", opts.get("fsdp_offload_params", "offload" in flags)))
        return {"kind": "fsdp2", "reshard": bool(reshard), "offload": offload}
    return {"kind": "ddp"}


def _layer_classes(model, cfg: TrainingConfig) -> set[str]:
    opts = cfg.fsdp_config.model_dump() if cfg.fsdp_config is not None else {}
    named = opts.get("transformer_layer_cls_to_wrap") or opts.get("fsdp_transformer_layer_cls_to_wrap")
    if named:
        return {named} if isinstance(named, str) else set(named)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or [])


def wrap(model: torch.nn.Module, cfg: TrainingConfig, topo: Topology) -> torch.nn.Module:
    """The module to call for forward/backward (the same object, sharded in place, under FSDP2)."""
    plan = strategy(cfg, topo)
    if plan["kind"] in ("single", "deepspeed"):  # DeepSpeed's engine wraps the model with its optimizer
        return model
    if plan["kind"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [topo.device.index] if topo.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=bool(cfg.ddp_find_unused_parameters))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(topo.device.type, (topo.world_size,))
    kwargs = {"mesh": mesh, "reshard_after_forward": plan["reshard"]}
    if plan["offload"]:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    classes = _layer_classes(model, cfg)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    log.info(
        "FSDP2 over %d ranks: %d %s blocks sharded, reshard_after_forward=%s, offload=%s",
        topo.world_size,
        len(layers),
        "/".join(sorted(classes)),
        plan["reshard"],
        plan["offload"],
    )
    return model


def no_grad_sync(engine: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync or hasattr(engine, "is_gradient_accumulation_boundary"):  # DeepSpeed syncs at its own boundary
        return contextlib.nullcontext()
    if hasattr(engine, "no_sync"):
        return engine.no_sync()
    if hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(False)
        return _restore_sync(engine)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(engine):
    try:
        yield
    finally:
        engine.set_requires_gradient_sync(True)


def all_sum(values: list[float], topo: Topology) -> list[float]:
    if topo.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=topo.device)
    dist.all_reduce(t)
    return t.tolist()

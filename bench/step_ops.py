"""How many ATen ops a step of `ftw train` dispatches on its main thread beyond the model's forward and backward:
on a host that sets the pace (short steps), each op is host time, so what the trainer adds to the bare loop of
bench/train_throughput.py shows here. CPU only, a tiny local model, the train stage in this process.

    .venv/bin/python bench/step_ops.py                  # 8 unpacked samples a step, 2 layers
    .venv/bin/python bench/step_ops.py --layers 4 --mbs 4

Counted under a TorchDispatchMode, per step after the first: the whole `Trainer.train_step`, the objective's loss
(the forward), `Tensor.backward` and the optimizer's step (on the CPU torch's per-parameter AdamW; on a GPU ftw's
runs fused: a few ops); the rest is the trainer's own (counts, copies, clipping, the readout).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def counted(phase: str, fn, into: dict):
    def wrapper(*args, **kwargs):
        with OpCount() as count:
            out = fn(*args, **kwargs)
        into[phase].append(count.ops)
        return out

    return wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mbs", type=int, default=8, help="unpacked samples a step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from bench.models import LORA_16, TIMED_RUN, build_cache
    from schemas.config import TrainingConfig
    from worker.devtools.tiny import build_model
    from worker.train import objective, trainer
    from worker.train.child import run

    work = Path(tempfile.mkdtemp(prefix="ftw-step-ops-"))
    model = build_model(work / "model", layers=a.layers)
    vocab = len(AutoTokenizer.from_pretrained(model))
    build_cache(work / "cache", a.steps, a.mbs, 256, vocab, unpacked=True)
    phases: dict[str, list[collections.Counter]] = collections.defaultdict(list)
    trainer.Trainer.train_step = counted("step", trainer.Trainer.train_step, phases)
    build_optimizer = trainer.build_optimizer

    def counted_optimizer(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        # a bound method still: the LR scheduler wraps it again through its __func__
        optimizer.step = types.MethodType(counted("optimizer", type(optimizer).step, phases), optimizer)
        return optimizer

    trainer.build_optimizer = counted_optimizer
    objective.SupervisedObjective.loss = counted("forward", objective.SupervisedObjective.loss, phases)
    torch.Tensor.backward = counted("backward", torch.Tensor.backward, phases)
    cfg = {  # bench/gpu_train.py's ftw arm's recipe
        "base_model": str(model),
        "datasets": [{"path": "bench.jsonl", "type": "completion"}],
        **LORA_16,
        **TIMED_RUN,
        "learning_rate": 1e-4,
        "micro_batch_size": a.mbs,
        "sequence_len": 256,
        "sample_packing": False,
        "max_steps": a.steps,
    }
    torch.set_num_threads(1)
    if run(TrainingConfig.model_validate(cfg), work / "run", work / "cache") != 0:
        raise SystemExit(f"the train stage failed: see {work / 'run'}")  # kept for reading
    shutil.rmtree(work)
    rows = []
    for counts in list(zip(phases["step"], phases["forward"], phases["backward"], phases["optimizer"]))[1:]:
        total, fwd, bwd, opt = (sum(c.values()) for c in counts)
        rows.append((total, fwd, bwd, opt, total - fwd - bwd - opt))
    print("| layers | mbs | ops a step | forward | backward | optimizer (CPU, per parameter) | the trainer's own |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    medians = [statistics.median(column) for column in zip(*rows)]
    print(f"| {a.layers} | {a.mbs} | " + " | ".join(f"{m:.0f}" for m in medians) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

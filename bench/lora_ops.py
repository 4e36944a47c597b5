"""One decoder layer's LoRA projections, forward + backward, on the GPU: PEFT against ftw's fused ops.

    python bench/lora_ops.py                       # the 8B and 1B shapes, every arm (< 60 s on an H200)
    python bench/lora_ops.py --shapes 8b --iters 50
    python bench/lora_ops.py --shapes tiny         # smoke test, also on CPU
    python bench/lora_ops.py --lora-dropout 0.05   # LoRA's dropout on every projection (axolotl's examples' 0.05)

A layer here is its seven projections, LoRA r=16 α=32 on each, bf16 frozen weights, fp32 adapters
(as PEFT keeps them): q/k/v of one input, o of another (the attention output), and the gated MLP
gate/up → SwiGLU → down of a third; attention itself is not in it. Arms, on the same weights, inputs
and output gradients:
- peft: PEFT's lora.Linear modules under bf16 autocast (what transformers+peft runs);
- previous (only with `--previous REV`, or a file's path): ftw_kernels' lora.py at that revision, read with
  `git show`, against today's other modules (a revision whose lora.py imports what no longer exists cannot be
  loaded: use bench/tree_ab.py for those); skipped where there is no git history (the device tool sends the
  working tree only: `git show REV:kernels/ftw_kernels/lora.py > .gpu/lora.py` into an ignored, carried folder
  and pass `--previous .gpu/lora.py`);
- casts: today's kernels/ftw_kernels/lora.py with ftw_kernels.adapter_copies.ENABLED off (A's
  stacked, adapters cast at every use);
- ftw: kernels/ftw_kernels/lora.py as it is;
- ftw, bordered: the same over bordered weights (what a trained model runs: kernels/ftw_kernels/bordered.py), run
  last (it re-lays the layer's q, k, v, gate and up weights in place); its q/k/v and MLP inputs carry the room
  beside their rows that the norms before them leave in a model.
Before each iteration the adapters are written in place (`add_(0)`, as an optimizer step would),
so ftw pays one refresh of its copies per iteration, as in training with one micro-batch a step.
Timing: CUDA events around each iteration, `--warmup` untimed, the median of `--iters`. Kernels:
GPU kernels (and memcpy/memset) of one iteration under torch.profiler. Peak: memory allocated above
the inputs and weights during one iteration. dx err: ‖dx − dx_peft‖/‖dx_peft‖ of the MLP input (with
`--lora-dropout` the arms draw other masks: the error is then the dropout's spread, not a check; the bordered arm
is left out, since a dropped input cannot use the bordered weights: kernels/ftw_kernels/lora_dropout.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the SwiGLU kernel on CPU (smoke test)

from ftw_kernels import adapter_copies, bordered  # noqa: E402
from ftw_kernels import lora as ftw_lora  # noqa: E402

# where lora.py lives: since ftw_kernels got its own import name, and before
LORA_PATHS = ("kernels/ftw_kernels/lora.py", "kernels/lora.py")
SHAPES = {  # tokens, hidden, q out, k/v out, intermediate
    "8b": (8192, 4096, 4096, 1024, 14336),
    "1b": (16384, 2048, 2048, 512, 8192),
    "tiny": (64, 32, 32, 16, 48),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_layer(shape: str, device: torch.device, dropout: float = 0.0) -> torch.nn.Module:
    """The seven projections as PEFT LoRA modules, bf16 base, fp32 adapters, B non-zero, in training mode."""
    from peft import LoraConfig, inject_adapter_in_model

    _, d, q, kv, inter = SHAPES[shape]
    sizes = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, inter),
        "up_proj": (d, inter),
        "down_proj": (inter, d),
    }
    torch.manual_seed(0)
    layer = torch.nn.Module()
    for name, (i, o) in sizes.items():
        setattr(layer, name, torch.nn.Linear(i, o, bias=False, device=device, dtype=torch.bfloat16))
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=list(PROJECTIONS))
    layer = inject_adapter_in_model(config, layer).train()
    for name, p in layer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # PEFT's autocast_adapter_dtype
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return layer


def peft_step(layer, x, attn, h):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
        o = layer.o_proj(attn)
        y = layer.down_proj(torch.nn.functional.silu(layer.gate_proj(h)) * layer.up_proj(h))
    return q, k, v, o, y


def fused_step(module):
    def step(layer, x, attn, h):
        p = {name: module.projection_of(getattr(layer, name)) for name in PROJECTIONS}
        q, k, v = module.lora_projections(x, [p["q_proj"], p["k_proj"], p["v_proj"]])
        (o,) = module.lora_projections(attn, [p["o_proj"]])
        return q, k, v, o, module.lora_gated_mlp(h, p["gate_proj"], p["up_proj"], p["down_proj"])

    return step


def previous_module(rev: str):
    """ftw_kernels' lora.py at git revision `rev` (or the file at path `rev`) as a module of its own;
    None without git history."""
    if Path(rev).is_file():
        source = Path(rev).read_text()
    else:
        source = next(filter(None, (git_show(rev, path) for path in LORA_PATHS)), None)
        if source is None:
            return None
    spec = importlib.util.spec_from_loader("previous_lora", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:lora.py", "exec"), module.__dict__)
    return module


def git_show(rev: str, path: str) -> str | None:
    try:
        command = ["git", "show", f"{rev}:{path}"]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def bordered_inputs(layer, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Border the layer's q, k, v and gate, up weights in place and give the q/k/v and MLP inputs the room a
    norm leaves beside their rows: the bordered arm's inputs (same values, leaves of their own)."""
    groups = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    rooms = [
        bordered.border_group(
            [getattr(layer, n).base_layer.weight for n in names],
            [getattr(layer, n).lora_A["default"].weight.shape[0] for n in names],
        )
        for names in groups
    ]
    x, attn, h = inputs
    return [_with_room(x, rooms[0]), attn, _with_room(h, rooms[1])]


def _with_room(t: torch.Tensor, room: int) -> torch.Tensor:
    leaf = bordered.with_room(t.shape[0], t.shape[1], room, t)
    with torch.no_grad():
        leaf.copy_(t)
    return bordered.mark(leaf.requires_grad_(), room)


@contextlib.contextmanager
def copies_enabled(on: bool):
    saved, adapter_copies.ENABLED = adapter_copies.ENABLED, on
    try:
        yield
    finally:
        adapter_copies.ENABLED = saved


class Timer:
    """CUDA events on the GPU; wall clock (after a sync) elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def measure(arm: str, step, layer, inputs, grads, adapters, args, device) -> dict:
    def iteration():
        for t in inputs:
            t.grad = None
        outs = step(layer, *inputs)
        torch.autograd.backward(outs, grads)

    def prepare():
        with torch.no_grad():
            for p in adapters:
                p.grad = None
                p.add_(0.0)  # what an optimizer step does to the version counter

    timer = Timer(device)
    times = []
    for i in range(args.warmup + args.iters):
        prepare()
        ms = timer(iteration)
        if i >= args.warmup:
            times.append(ms)
    prepare()
    kernels = "—"
    if device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            iteration()
            torch.cuda.synchronize()
        kernels = str(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
        prepare()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        iteration()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = float("nan")
    return {"arm": arm, "ms": statistics.median(times), "kernels": kernels, "peak": peak, "dx": inputs[2].grad.float()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8b,1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--previous", help="git revision of a previous lora.py, or a copy's path: one more arm")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="every projection's lora_dropout")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previous = previous_module(args.previous) if args.previous else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; median of {args.iters} iterations after {args.warmup} warm-up")
    if args.previous and previous is None:
        print(f"arm 'previous' skipped: no git history here to read lora.py at {args.previous}")
    rows = []
    dropped = f", lora_dropout {args.lora_dropout:g}" if args.lora_dropout else ""
    for shape in args.shapes.split(","):
        tokens, d, q, _, _ = SHAPES[shape]
        layer = build_layer(shape, device, args.lora_dropout)
        adapters = [p for n, p in layer.named_parameters() if "lora_" in n]
        torch.manual_seed(1)
        inputs = [
            torch.randn(tokens, width, device=device, dtype=torch.bfloat16).requires_grad_() for width in (d, q, d)
        ]
        with torch.no_grad():
            grads = [torch.randn_like(t) for t in peft_step(layer, *inputs)]
        arms = [("peft", peft_step, True)]
        if previous is not None:
            arms.append(("previous", fused_step(previous), True))
        arms += [("ftw, casts at every use", fused_step(ftw_lora), False), ("ftw", fused_step(ftw_lora), True)]
        results = []
        for arm, step, copies in arms:
            with copies_enabled(copies):
                results.append(measure(arm, step, layer, inputs, grads, adapters, args, device))
        if not args.lora_dropout:
            roomy = bordered_inputs(layer, inputs)
            results.append(measure("ftw, bordered", fused_step(ftw_lora), layer, roomy, grads, adapters, args, device))
        base = results[0]
        for r in results:
            err = ((r["dx"] - base["dx"]).norm() / base["dx"].norm()).item()
            rows.append(
                f"| {shape} | {r['arm']}{dropped} | {r['ms']:.2f} | {base['ms'] / r['ms']:.2f}× | {r['kernels']} | "
                f"{r['peak']:.2f} | {err:.1e} |"
            )
        del layer, adapters, inputs, grads, results
    print("| shape | arm | ms / layer fwd+bwd | × peft | GPU kernels | peak GiB | dx err vs peft |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

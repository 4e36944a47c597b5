"""The rotary angles: transformers' forward (one fp32 GEMM of the inverse frequencies and the positions) against
ftw's (kernels/ftw_kernels/rope_angles.py: an elementwise product, cos and sin over half the width). For each: the
torch ops a call, its time a call, and how far its cos moves from the exact one when fp32 GEMMs take TF32 inputs
(on the CPU through tests/kernels/test_rope_angles.py's emulation of the tensor cores; on a GPU, with TF32 allowed,
what this GPU's cuBLAS does, and the time on the device's clock).

    .venv/bin/python bench/rope_angles.py                 # the 1B shape's rows (8 × 2048) and one 32k-token row
    python bench/rope_angles.py --device cuda             # on the device machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.models import PUBLIC_SHAPES  # noqa: E402
from ftw_kernels import rope_angles  # noqa: E402
from tests.kernels.test_rope_angles import TensorCores  # noqa: E402


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def rotary(shape: str, device: str):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    spec = PUBLIC_SHAPES[shape]
    config = LlamaConfig(
        hidden_size=spec["hidden_size"],
        num_attention_heads=spec["num_attention_heads"],
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
    )
    return LlamaRotaryEmbedding(config).to(device)


def ms_a_call(modules: dict, x, pos, repeat: int) -> dict[str, float]:
    """Each module's median time a call, the modules' calls interleaved (the machine's drift falls on both)."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeat):
        for name, module in modules.items():
            if x.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                module(x, pos)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                module(x, pos)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def cos_error(module, x, pos, tf32: bool) -> float:
    """The largest distance of cos from float64's cos of the exact fp32 angles (each product rounded once)."""
    exact = (pos[..., None].float() * module.inv_freq.float()).double().cos()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        if tf32 and not x.is_cuda:
            with TensorCores():
                cos = module(x, pos)[0]
        else:
            cos = module(x, pos)[0]
    finally:
        torch.set_float32_matmul_precision(before)
    return (cos[..., : exact.shape[-1]].double() - exact).abs().max().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b", choices=sorted(PUBLIC_SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [("8 × 2048", torch.arange(2048).repeat(8, 1)), ("1 × 32768", torch.arange(32768)[None])]
    spec = PUBLIC_SHAPES[a.shape]
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    print(f"{a.shape}: head_dim {head_dim}, rope_theta {spec['rope_theta']:g}; {a.device}, torch {torch.__version__}")
    print()
    print("| positions | forward | torch ops a call | ms a call | × ftw | cos error, fp32 | cos error, TF32 GEMMs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, pos in rows:
        pos = pos.to(a.device)
        x = torch.zeros(1, dtype=torch.bfloat16, device=a.device)
        modules = {"transformers": rotary(a.shape, a.device), "ftw": rotary(a.shape, a.device)}
        rope_angles.install(modules["ftw"])
        ops = {}
        for name, module in modules.items():
            module(x, pos)  # warm
            with OpCount() as count:
                module(x, pos)
            ops[name] = count.ops
        ms = ms_a_call(modules, x, pos, a.repeat)
        for name, module in modules.items():
            x32 = x.float()  # the errors on fp32 outputs: bf16's own rounding would hide the angles'
            exact, rounded = cos_error(module, x32, pos, tf32=False), cos_error(module, x32, pos, tf32=True)
            print(
                f"| {label} | {name} | {ops[name]} | {ms[name]:.3f} | {ms[name] / ms['ftw']:.2f}× | {exact:.1e} "
                f"| {rounded:.1e} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

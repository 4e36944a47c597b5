"""The one wheel folder bench/qlora.py needs on the GPU machine (no internet there), built here.

    .venv/bin/python bench/qlora_wheels.py [--out .whl-qlora]

What the device image lacks for the three QLoRA arms: bitsandbytes (QLoRA's 4-bit storage), the
Unsloth peer at the pins ../shared/peers/README.md measured it with, and what `python -m worker.train`
imports beyond the image (datasets, pydantic and theirs, at requirements.lock's pins); not the
worker's S3/RunPod side, so `.whl` (bench/gpu_wheels.py) need not travel with it. Two wheels are
slimmed (a local copy for measuring only): bitsandbytes keeps its CUDA 13 libraries alone (the
image's torch is cu130), Unsloth drops its `studio/` web UI. Fails above `gpu_wheels.LIMIT_MIB`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gpu_wheels import LIMIT_MIB, slim_wheel  # noqa: E402

PINS = (
    "bitsandbytes==0.50.2",
    "unsloth==2026.10.9",
    "unsloth_zoo==2026.10.9",
    "trl==1.15.0",
    "tyro==1.0.17",
    "msgspec==0.23.0",
    "cut_cross_entropy==25.1.1",
    "json5==0.17.3",
    "structlog==26.1.0",
    "nest_asyncio==1.6.0",
    "hf_transfer==0.1.9",
    "docstring_parser==0.18.0",
    "typeguard==4.6.1",
    "shtab==1.13.0",
)
TRAIN_NEEDS = (
    "datasets",
    "dill",
    "multiprocess",
    "xxhash",
    "fsspec",
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64", "any")


def bitsandbytes_kept(name: str) -> bool:
    """Everything but the native libraries of other CUDA majors, ROCm, XPU and CPU."""
    lib = name.startswith("bitsandbytes/libbitsandbytes_")
    return not lib or name.startswith("bitsandbytes/libbitsandbytes_cuda13")


def unsloth_kept(name: str) -> bool:
    return not name.startswith("studio/")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / ".whl-qlora")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    platforms = [a for tag in PLATFORMS for a in ("--platform", tag)]
    locked = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line)
    pins = [*PINS, *(f"{name}=={locked[name]}" for name in TRAIN_NEEDS)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        + ["--implementation", "cp", *platforms, "-d", str(args.out), *pins],
        check=True,
    )
    for pattern, kept in (("bitsandbytes-*.whl", bitsandbytes_kept), ("unsloth-*.whl", unsloth_kept)):
        for wheel in args.out.glob(pattern):
            slim_wheel(wheel, kept)
    wheels = sorted(args.out.glob("*.whl"))
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out} (limit {LIMIT_MIB} MiB)")
    return 0 if total <= LIMIT_MIB * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())

"""The wheelhouse `bench/gpu_worker.sh` installs on the GPU machine (no internet there), built here.

    .venv/bin/python bench/gpu_wheels.py [--out .whl]

The device image has torch 2.11, transformers, peft, accelerate, triton, tokenizers, numpy, pandas,
pyarrow and huggingface_hub (Python 3.12); it lacks runpod, datasets, pydantic, boto3, matplotlib
and their dependencies. This resolves ftw's worker needs for linux x86_64 / Python 3.12 (uv, from
PyPI), leaves out what the image has and what a platform-mode runpod worker never imports (the
SDK's FastAPI test server and its CLI), downloads the rest as binary wheels, and slims botocore to
the S3 services (its data for 400 other services is 15 MB). The device tool carries at most 64 MiB:
this fails when the folder would be larger. Prints one line per wheel and the total.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60  # the device tool's 64 MiB, less room for the rest of what travels
PLATFORM = ["--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.12"]
WORKER_NEEDS = ("runpod", "datasets", "pydantic", "pyyaml", "boto3", "filelock", "psutil", "matplotlib", "aiohttp")
# DeepSpeed is an sdist on PyPI: built here into a pure-Python wheel (DS_BUILD_OPS=0, no ops), its
# dependencies other than torch downloaded as wheels (bench/gpu_multi.sh's ZeRO arms need it)
DEEPSPEED_DEPS = ("hjson", "msgpack", "einops", "ninja", "py-cpuinfo")
BENCH_TOOLS = ("py-spy",)  # bench/host_samples.py's sampler (its binary lands in $FTW_SITE/bin)
IMAGE_HAS = {
    "numpy",
    "pandas",
    "pyarrow",
    "huggingface-hub",
    "hf-xet",
    "jinja2",
    "markupsafe",
    "packaging",
    "typing-extensions",
}
# the runpod SDK's local FastAPI server (--rp_serve_api), its CLI and their extras: platform mode imports none
NOT_IMPORTED = {
    "fastapi",
    "fastapi-cli",
    "fastapi-cloud-cli",
    "starlette",
    "uvicorn",
    "uvloop",
    "watchfiles",
    "websockets",
    "httptools",
    "python-multipart",
    "itsdangerous",
    "email-validator",
    "dnspython",
    "pydantic-settings",
    "pydantic-extra-types",
    "python-dotenv",
    "sentry-sdk",
    "rich",
    "rich-toolkit",
    "typer",
    "shellingham",
    "markdown-it-py",
    "mdurl",
    "pygments",
    "inquirerpy",
    "pfzy",
    "prompt-toolkit",
    "wcwidth",
    "watchdog",
    "prettytable",
    "rignore",
    "fastar",
    "agent-detector",
    "detect-installer",
    "truststore",
    "httpx2",
    "httpcore2",
    "annotated-doc",
    "protobuf",
    "googleapis-common-protos",
}
BOTOCORE_KEEP = ("s3", "s3control", "sts", "sso", "sso-oidc")


def closure(tmp: Path) -> list[str]:
    """`name==version` of everything WORKER_NEEDS pulls in, at requirements.txt's pins."""
    pinned = {
        re.sub(r"[-_.]+", "-", m[1]).lower(): m[0]
        for m in re.finditer(r"^([A-Za-z0-9][\w.-]*)==\S+", (REPO / "requirements.txt").read_text(), re.M)
    }
    wanted = tmp / "wanted.txt"
    wanted.write_text("\n".join(pinned[name] for name in WORKER_NEEDS) + "\n")
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "uv"),
            "pip",
            "compile",
            str(wanted),
            *PLATFORM,
            "--no-header",
            "--no-annotate",
            "-q",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if "==" in line]


def skip(pin: str) -> bool:
    name = pin.split("==")[0].lower()
    return (
        name in IMAGE_HAS or name in NOT_IMPORTED or name.startswith("opentelemetry-") and name != "opentelemetry-api"
    )


def slim_botocore(wheel: Path) -> None:
    """Keep botocore/data's top-level files and the S3/STS/SSO services."""

    def kept(name: str) -> bool:
        parts = name.split("/")
        return not (parts[0] == "botocore" and len(parts) > 3 and parts[1] == "data" and parts[2] not in BOTOCORE_KEEP)

    slim_wheel(wheel, kept)


def slim_wheel(wheel: Path, kept: Callable[[str], bool]) -> None:
    """Rewrite `wheel` in place with only the files `kept` accepts; their RECORD lines go too."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not kept(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(
                    row for row in data.decode().splitlines(keepends=True) if kept(row.split(",")[0])
                ).encode()
            dst.writestr(item, data)
    slim.replace(wheel)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / ".whl")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        carry = [pin for pin in closure(Path(tmp)) if not skip(pin)]
        locked = dict(
            line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line
        )
        carry += [
            f"{name}=={locked[name]}"
            for name in DEEPSPEED_DEPS + BENCH_TOOLS
            if not any(p.lower().startswith(name + "==") for p in carry)
        ]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "-w",
                str(args.out),
                f"deepspeed=={locked['deepspeed']}",
            ],
            env={**os.environ, "DS_BUILD_OPS": "0"},
            check=True,
        )
        (Path(tmp) / "carry.txt").write_text("\n".join(carry) + "\n")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--implementation",
                "cp",
                "--abi",
                "cp312",
                "--abi",
                "abi3",
                "--abi",
                "none",
                *[
                    a
                    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
                    for a in ("--platform", tag)
                ],
                "--index-url",
                "https://pypi.org/simple",
                "-d",
                str(args.out),
                "-r",
                str(Path(tmp) / "carry.txt"),
            ],
            check=True,
        )
    for wheel in args.out.glob("botocore-*.whl"):
        slim_botocore(wheel)
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out} (limit {LIMIT_MIB} MiB)")
    return 0 if total <= LIMIT_MIB * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())

"""`kernels` is Hugging Face's package (transformers imports it when it is installed); ours is `ftw_kernels`.

A scratch environment gets HF's real `kernels` and ftw, installed the two ways ftw is: editable
(`make setup`, the image's Dockerfile) and as a wheel (`pip install .`). With the repository root
first on sys.path, as `python handler.py` has it in the image, `import kernels` must find HF's
package, `import ftw_kernels` ours, and ftw's registry must still patch a tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.kernels.test_apply_kernels import FULL

pytestmark = pytest.mark.slow

# HF's package at a version transformers 5.17 takes (0.16 <= v < 0.17), and the one dependency of
# it that this venv lacks; the others (huggingface_hub, packaging, pyyaml) are this venv's
HF_KERNELS = ("kernels==0.16.2", "kernels-data==0.16.2")
# the signs of pip finding no package index (as opposed to a wrong pin, which lists the versions it saw)
UNREACHABLE = ("(from versions: none)", "Failed to establish a new connection", "Temporary failure in name resolution")
CHECK = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})  # the repository root first
import kernels, ftw_kernels
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils.import_utils import is_kernels_available
from schemas.config import TrainingConfig

config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, vocab_size=97)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=targets))
cfg = TrainingConfig(base_model="tiny", learning_rate=1e-3, adapter="lora", use_kernels=True)
print(json.dumps({{
    "kernels": kernels.__file__,
    "hf_api": callable(getattr(kernels, "get_kernel", None)),
    "transformers_sees_it": is_kernels_available(),
    "ftw_kernels": ftw_kernels.__file__,
    "registry": ftw_kernels.registry.__file__,
    "applied": ftw_kernels.apply_kernels(model, cfg),
}}))
"""


def pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """This venv's pip, installing into `python`'s environment."""
    command = [sys.executable, "-m", "pip", "--python", str(python), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def hf_kernels_wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """HF's `kernels` wheels, fetched once from the package index (skips only when it is unreachable)."""
    folder = tmp_path_factory.mktemp("hf-kernels")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "30"]
    got = subprocess.run([*command, "--dest", str(folder), *HF_KERNELS], capture_output=True, text=True, timeout=600)
    if got.returncode != 0:
        output = got.stdout + got.stderr
        if any(sign in output for sign in UNREACHABLE):
            pytest.skip(f"the package index is unreachable, so HF's kernels cannot be fetched: {output.strip()[-300:]}")
        pytest.fail(f"pip download {' '.join(HF_KERNELS)} failed:\n{output}")
    return sorted(folder.glob("*.whl"))


def scratch_env(root: Path, wheels: list[Path]) -> tuple[Path, Path]:
    """A venv whose site-packages holds HF's kernels and then reads this venv's (torch, transformers,
    peft, triton) as a plain path: this venv's own .pth files, ftw's editable finder among them, stay out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "zz_ftw_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = pip(python, "install", "--no-deps", "--no-index", *map(str, wheels))
    assert installed.returncode == 0, installed.stderr
    return python, Path(site)


def check(python: Path) -> dict[str, object]:
    """What `kernels` and `ftw_kernels` resolve to under `python`, run from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tests' own path to kernels/ stays out
    done = subprocess.run(
        [python, "-c", CHECK], cwd=REPO, env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_hf_kernels_and_ours(seen: dict[str, object], site: Path) -> None:
    assert seen["kernels"] == str(site / "kernels" / "__init__.py")
    assert seen["hf_api"] and seen["transformers_sees_it"]
    assert seen["applied"] == FULL


def test_editable_install_keeps_hf_kernels_importable(hf_kernels_wheels: list[Path], tmp_path: Path) -> None:
    python, site = scratch_env(tmp_path / "venv", hf_kernels_wheels)
    installed = pip(python, "install", "--no-deps", "--no-build-isolation", "-e", str(REPO))
    assert installed.returncode == 0, installed.stderr
    seen = check(python)
    assert_hf_kernels_and_ours(seen, site)
    assert seen["ftw_kernels"] == str(REPO / "kernels" / "ftw_kernels" / "__init__.py")


def test_wheel_install_keeps_hf_kernels_importable(hf_kernels_wheels: list[Path], tmp_path: Path) -> None:
    python, site = scratch_env(tmp_path / "venv", hf_kernels_wheels)
    source = tmp_path / "ftw"  # a copy: building a wheel writes build/ and *.egg-info beside the sources
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    for folder in ("schemas", "worker", "kernels"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    installed = pip(python, "install", "--no-deps", "--no-build-isolation", str(source))
    assert installed.returncode == 0, installed.stderr
    seen = check(python)
    assert_hf_kernels_and_ours(seen, site)
    assert seen["ftw_kernels"] == str(site / "ftw_kernels" / "__init__.py")
    registry = Path(str(seen["registry"]))
    assert registry.read_bytes() == (REPO / "kernels" / "ftw_kernels" / "registry.py").read_bytes()

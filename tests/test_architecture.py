"""docs/architecture.md's structure holds for the tree (tests/architecture.py reads it from the imports), and the
checker finds each kind of problem in small trees."""

from __future__ import annotations

from pathlib import Path

from tests.architecture import REPO, modules_of, problems


def test_the_tree_follows_docs_architecture() -> None:
    found = problems(REPO)
    assert not found, f"{len(found)} problems with docs/architecture.md's structure:\n" + "\n".join(found)


# ---- the checker itself, on small trees --------------------------------------------------------------
def tree(root: Path, files: dict[str, str]) -> Path:
    """Files of a tree (every folder a package) under `root`."""
    for name, text in {"worker/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        for folder in path.relative_to(root).parents[:-1]:
            (root / folder / "__init__.py").touch()
    return root


CLEAN = {
    "handler.py": "from worker.job import pipeline\n",
    "worker/cli.py": "import importlib\nCOMMANDS = {'endpoint': 'worker.devtools.endpoint'}\n"
    "def main():\n    importlib.import_module(COMMANDS['endpoint'])\n",
    "worker/devtools/endpoint.py": "from worker.job.rundir import RunDir\n",
    "worker/job/pipeline.py": "from worker.checks import machine\nfrom . import rundir\nfrom worker.errors import E\n",
    "worker/job/rundir.py": "from schemas.job import JobInput\n",
    "worker/checks/machine.py": "from worker.estimate.model import predict\n",
    "worker/serve/app.py": "from worker.publish.pull import pull\n",
    "worker/publish/pull.py": "import worker.events\n",
    "worker/estimate/model.py": "from worker.data.manifest import Manifest\n",
    "worker/data/manifest.py": "from ..errors import FtwError\n",
    "worker/train/model.py": "def build():\n    from ftw_kernels import apply_kernels\n",
    "worker/errors.py": "import json\n",
    "worker/events.py": "from worker.errors import FtwError\n",
    "schemas/job.py": "import pydantic\n",
    "kernels/ftw_kernels/__init__.py": "from ftw_kernels.registry import apply_kernels\n",
    "kernels/ftw_kernels/registry.py": "import torch\n",
}


def test_a_tree_that_follows_the_layers_has_no_problems(tmp_path: Path) -> None:
    assert problems(tree(tmp_path, CLEAN)) == []
    assert "ftw_kernels.registry" in modules_of(tmp_path)  # the kernels/ folder under its import name


def test_an_import_up_a_layer_is_listed_lazy_relative_and_by_name_ones_included(tmp_path: Path) -> None:
    found = problems(
        tree(
            tmp_path,
            {
                **CLEAN,
                "schemas/job.py": "import pydantic\n\n\ndef f():\n    from worker.job import pipeline\n",
                "worker/events.py": "from .job.pipeline import run\n",
                "worker/lifeline.py": "import typing\nif typing.TYPE_CHECKING:\n    from worker.train.model import M\n",
                "worker/data/manifest.py": "import importlib\nimportlib.import_module('handler')\n",
            },
        )
    )
    assert [p for p in found if "cycle" not in p] == [  # each up import here closes a cycle too
        "up a layer (contracts -> orchestrator): schemas.job imports worker.job.pipeline at schemas/job.py:5 (lazy)",
        "up a layer (stage libraries -> entries): worker.data.manifest imports handler at worker/data/manifest.py:2 "
        "(by name)",
        "up a layer (foundation -> orchestrator): worker.events imports worker.job.pipeline at worker/events.py:1",
        "up a layer (foundation -> stages): worker.lifeline imports worker.train.model at worker/lifeline.py:3 "
        "(type-checking only)",
    ]


def test_sideways_imports_and_kernels_outside_train_are_listed(tmp_path: Path) -> None:
    found = problems(
        tree(
            tmp_path,
            {
                **CLEAN,
                "worker/publish/pull.py": "from worker.train import model\n",
                "worker/data/manifest.py": "from ftw_kernels.registry import apply_kernels\n",
                "worker/train/model.py": "from kernels import get_kernel\n",
            },
        )
    )
    assert found == [
        "worker.train.model imports kernels at worker/train/model.py:1: `kernels` is Hugging Face's package; "
        "ours (the kernels/ folder) is ftw_kernels",
        "only worker.train may import ftw_kernels: worker.data.manifest imports ftw_kernels.registry at "
        "worker/data/manifest.py:1",
        "sideways within stages, not allowed by docs/architecture.md: worker.publish.pull imports worker.train.model "
        "at worker/publish/pull.py:1",
    ]


def test_a_file_cycle_is_listed_with_each_import(tmp_path: Path) -> None:
    found = problems(
        tree(
            tmp_path,
            {
                **CLEAN,
                "worker/train/trainer.py": "from worker.train import checkpoint\n",
                "worker/train/checkpoint.py": "def save(trainer):\n    from worker.train.trainer import Trainer\n",
            },
        )
    )
    assert found == [
        "file cycle: worker.train.checkpoint -> worker.train.trainer -> worker.train.checkpoint"
        "\n    worker.train.checkpoint imports worker.train.trainer at worker/train/checkpoint.py:2 (lazy)"
        "\n    worker.train.trainer imports worker.train.checkpoint at worker/train/trainer.py:1"
    ]


def test_a_package_cycle_without_a_file_cycle_is_listed(tmp_path: Path) -> None:
    found = problems(
        tree(tmp_path, {**CLEAN, "worker/data/pipeline.py": "from worker.estimate.model import predict\n"})
    )
    assert found == [
        "sideways within stage libraries, not allowed by docs/architecture.md: worker.data.pipeline imports "
        "worker.estimate.model at worker/data/pipeline.py:1",
        "package cycle: worker.data -> worker.estimate -> worker.data"
        "\n    worker.data.pipeline imports worker.estimate.model at worker/data/pipeline.py:1"
        "\n    worker.estimate.model imports worker.data.manifest at worker/estimate/model.py:1",
    ]


def test_a_module_outside_every_layer_is_listed(tmp_path: Path) -> None:
    found = problems(tree(tmp_path, {**CLEAN, "worker/preflight.py": ""}))
    assert found == ["in no layer of docs/architecture.md: worker.preflight (worker/preflight.py)"]

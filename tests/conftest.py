"""Shared fixtures: tiny models and tokenizers built locally once per session (no Hub here)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the tests' vLLM engines (CPU build): a 128 MiB KV cache, ~130k tokens of the tiny models, far more than their
# 8 short sequences; ftw's default (a quarter of available memory) took vLLM 10-20 s more to allocate in the suite,
# and VLLM_CPU_KVCACHE_SPACE takes whole GiB only. tests/serve/test_requests.py checks that default without an engine.
VLLM_TEST_KV_CACHE = "--kv-cache-memory-bytes 134217728"
# This checkout's code, for the tests and every child they start, whatever a shared venv's editable
# install points at: the repo root, and kernels/, the folder that holds the package ftw_kernels
# (an install maps it there through pyproject.toml).
IMPORT_PATH = [str(REPO), str(REPO / "kernels")]
sys.path[:0] = [p for p in IMPORT_PATH if p not in sys.path]
os.environ["PYTHONPATH"] = os.pathsep.join([*IMPORT_PATH, *filter(None, [os.environ.get("PYTHONPATH")])])
# A shell that starts the suite in the background (`make test &`) hands it SIGINT ignored, and every
# child would inherit that: the Ctrl-C tests' children would never see their SIGINT. A handler here
# is reset to the default in each child that is exec'd, so they start as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Without a GPU the Triton kernels run through Triton's interpreter, for every test and child: the variable is read
# when triton.jit decorates, so it is set before any test module imports ftw_kernels (the trainer's in-process runs
# with use_kernels: true need it as much as the kernel tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fixtures `s3_server` (real rclone S3 on loopback) and `hub_server` (local Hub HTTP API)
pytest_plugins = ["tests.s3server", "tests.hubserver"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init Llama-architecture model with a ChatML tokenizer."""
    from worker.devtools.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-chatml"), style="chatml")


@pytest.fixture(scope="session")
def llama3_model_dir(tmp_path_factory) -> Path:
    from worker.devtools.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-llama3"), style="llama3")


@pytest.fixture
def volume(tmp_path, monkeypatch) -> Path:
    """An empty BASE_VOLUME for one test, with CPU runs allowed."""
    root = tmp_path / "volume"
    root.mkdir()
    monkeypatch.setenv("BASE_VOLUME", str(root))
    monkeypatch.setenv("FTW_ALLOW_CPU", "1")
    return root


@pytest.fixture
def count_host_refreshes(monkeypatch):
    """Call it to start counting the adapter copies' host refreshes (ftw_kernels.adapter_copies._refresh_stale, which
    still runs): it returns the list that grows by one a refresh."""
    from ftw_kernels import adapter_copies

    def start() -> list[int]:
        calls: list[int] = []
        real = adapter_copies._refresh_stale

        def counted() -> None:
            calls.append(1)
            real()

        monkeypatch.setattr(adapter_copies, "_refresh_stale", counted)
        return calls

    return start


def randomise_lora_b(model, std: float) -> None:
    """Normal(0, std) LoRA B weights: PEFT starts B at zero, where the adapter path carries nothing."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def quantise_linears_8bit(model) -> None:
    """Every Linear but the output layer as a bitsandbytes Linear8bitLt, as `load_in_8bit` loads them (LLM.int8's
    outlier threshold 6.0), quantised on the Linear's device (bitsandbytes' CPU backend quantises too). Int8Params
    quantise when they move off the CPU (or on it), so each weight starts there: one already on the GPU would stay
    unquantised in floating point."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False, threshold=6.0)
                weight = child.weight.data.cpu()
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
                setattr(parent, name, layer.to(child.weight.device))  # .to quantises
    model.is_loaded_in_8bit = True  # PEFT then wraps them in its bitsandbytes LoRA layers


def child_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses of tests: the repo importable, no stray credentials. Folders already on
    PYTHONPATH stay after the repo's (the device machine's packages live in one: bench/gpu_env.sh)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_TOKEN", "WANDB_", "RUNPOD_"))}
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in IMPORT_PATH]
    env["PYTHONPATH"] = os.pathsep.join([*IMPORT_PATH, *inherited])
    env.update(extra)
    return env


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def worker_group(nodeid: str) -> str:
    """What one pytest-xdist worker runs whole: a test's file, or tests/serve (its package-scoped engines start
    once)."""
    return "tests/serve" if nodeid.startswith("tests/serve/") else nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two workers (pytest-xdist): each file goes whole to one worker, as its module fixtures and
    order expect, and tests/serve goes whole to one. (xdist's `loadgroup` marks no longer group anything under
    pytest 9, which names a node by `_id`, not the `_nodeid` xdist rewrites: every test went on its own, and
    module fixtures such as a vLLM engine's started once per worker, or again after another file's tests.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False  # handed out in the order below, not by their counts of tests
    return ByWorkerGroup(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """The groups longest first, as far as the marks tell: tests/serve, then the files by their count of `slow`
    tests, then the rest. The long ones are handed out early, and the short ones fill the workers' ends instead of
    one worker finishing a long file alone."""
    slow: dict[str, int] = {}
    for item in items:
        group = worker_group(item.nodeid)
        slow[group] = slow.get(group, 0) + (item.get_closest_marker("slow") is not None)

    def rank(i: int) -> tuple[bool, int]:
        group = worker_group(items[i].nodeid)
        return group != "tests/serve", -slow[group]

    items[:] = [items[i] for i in sorted(range(len(items)), key=rank)]

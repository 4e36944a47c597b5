"""A process that imports ftw's worker and then peft (and with it bitsandbytes and torchao) logs none of
their import-time warnings whose advice cannot apply to ftw (worker/__init__.py says why): bitsandbytes'
"Failed to load CPU gemm_4bit_forward ... pip install kernels" (logged on CPUs with AVX512-BF16), torchao's
"Failed to load ..._C_*.so" (where its CUDA extensions cannot load) and torch's pytree notice about
torchao's Enums. The stderr checks bite where each is logged; the loggers' levels are checked everywhere."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

LOGGERS = ("bitsandbytes.backends.cpu.ops", "torchao", "torch.utils._pytree")


def test_worker_import_silences_the_import_warnings_that_do_not_apply():
    code = (
        "import logging, worker, peft\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"print(*(logging.getLogger(name).getEffectiveLevel() for name in {LOGGERS!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    assert all(int(level) >= 40 for level in proc.stdout.split()[-len(LOGGERS) :])  # logging.ERROR
    assert "gemm_4bit_forward" not in proc.stderr
    assert "Failed to load" not in proc.stderr and "Enum subclass" not in proc.stderr

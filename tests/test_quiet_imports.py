"""A process that imports ftw's worker and then peft (and with it bitsandbytes) logs no bitsandbytes
"Failed to load CPU gemm_4bit_forward ... pip install kernels" line: advice that cannot apply to ftw
(worker/__init__.py says why). The stderr check bites on CPUs with AVX512-BF16, where bitsandbytes logs
it; the logger's level is checked everywhere."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_worker_import_silences_the_bitsandbytes_cpu_kernel_warning():
    code = (
        "import logging, worker, peft\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "print(logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    assert int(proc.stdout.split()[-1]) >= 40  # logging.ERROR
    assert "gemm_4bit_forward" not in proc.stderr

"""ftw's worker: the job path (worker/job), its stages and the serving worker.

Importing it silences one third-party warning in every ftw process: bitsandbytes, imported with peft,
logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels" on hosts whose
CPU has AVX512-BF16, GPU workers included. Its advice does not apply here (ftw trains 4-bit bases on
GPUs, the Hub kernel it would download is unreachable offline, and Hugging Face's `kernels` package
would be shadowed by ftw's own kernels/ folder), so in a job's log it would only read as a failure.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

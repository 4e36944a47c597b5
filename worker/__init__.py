"""ftw's worker: the job path (worker/job), its stages and the serving worker.

Importing it silences third-party import-time warnings whose advice cannot apply to ftw, in every ftw
process (they would only read as failures in a job's log):
- bitsandbytes, imported with peft, logs "Failed to load CPU gemm_4bit_forward from kernels-community ...
  pip install kernels" on hosts whose CPU has AVX512-BF16, GPU workers included: ftw trains 4-bit bases on
  GPUs, the Hub kernel it would download is unreachable offline, and Hugging Face's `kernels` package
  would be shadowed by ftw's own kernels/ folder.
- torchao, imported with peft (transformers' torchao quantizer), logs "Failed to load .../_C_*.so" where
  its CUDA extensions cannot load (a CPU-only torch), and torch logs that torchao registers Enums with
  pytree "deprecated": ftw uses torchao's pure-Python low-bit optimizers only.
"""

import logging

for name in ("bitsandbytes.backends.cpu.ops", "torchao", "torch.utils._pytree"):
    logging.getLogger(name).setLevel(logging.ERROR)

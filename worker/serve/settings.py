"""The serving worker's settings, read once from the environment (names follow worker-vllm's).

| variable | meaning (default) |
|---|---|
| `MODEL_NAME` | base model: Hub id or local folder (required) |
| `OPENAI_SERVED_MODEL_NAME_OVERRIDE` | the name clients use for the base model (`MODEL_NAME`) |
| `FTW_SERVE_ENGINE` | `vllm`, `transformers` or `auto` (vLLM when the engine Python has it) |
| `FTW_SERVE_PYTHON` | Python that runs the engine child (this one) |
| `ENABLE_LORA` / `MAX_LORAS` / `MAX_LORA_RANK` / `MAX_CPU_LORAS` | adapter slots (true / 4 / 64 / 16) |
| `MAX_MODEL_LEN` / `MAX_NUM_SEQS` / `GPU_MEMORY_UTILIZATION` | engine settings (the engine's own defaults) |
| `TENSOR_PARALLEL_SIZE` / `ENFORCE_EAGER` / `SEED` | engine settings (the engine's own defaults) |
| `DTYPE` | the engines' dtype (the model's own, from its config.json, on both engines) |
| `VLLM_CPU_KVCACHE_SPACE` | vLLM CPU KV cache GiB (¼ of memory at start, 1–8; not when `GPU_MEMORY_UTILIZATION` is) |
| `VLLM_EXTRA_ARGS` | further `vllm serve` flags, shell-quoted |
| `MAX_CONCURRENCY` | jobs one worker takes at once (vLLM: `MAX_NUM_SEQS` or 8; transformers: 2) |
| `FTW_SERVE_ADAPTERS` | adapters loaded at start: `name=ref,name=ref` (ref: as in a request) |
| `BUCKET_NAME` / `FTW_S3_PREFIX` / `BUCKET_*` | where run ids are found, and S3 credentials (as for publishing) |
| `HF_TOKEN` / `HF_ENDPOINT` | Hub access for adapters named `org/repo[@revision]` |
| `FTW_SERVE_CACHE_GB` | adapter disk cache size under `BASE_VOLUME/cache/adapters` (20); least recently used go first |
| `FTW_SERVE_BASE_ALIASES` | other names of the base model accepted in adapters' `base_model_name_or_path` |
| `FTW_SERVE_START_TIMEOUT_S` | how long the engine may take to answer /health (900) |
| `FTW_ENGINE_KEEP_ALIVE_S` | seconds the engine keeps an idle connection (5, uvicorn's); ftw's pool lets go at 0.4× |
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import JobSpecError

ENGINES = ("auto", "vllm", "transformers")
ENGINE_KEEP_ALIVE_S = 5  # uvicorn's default, which vLLM keeps


@dataclass(frozen=True)
class ServeSettings:
    model: str
    served_name: str
    engine: str = "auto"
    python: str = sys.executable
    enable_lora: bool = True
    max_loras: int = 4
    max_lora_rank: int = 64
    max_cpu_loras: int = 16
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None
    enforce_eager: bool = False
    seed: int | None = None
    vllm_extra_args: tuple[str, ...] = ()
    max_concurrency: int | None = None
    preload: tuple[tuple[str, str], ...] = ()
    cache_bytes: int = 20 * 2**30
    base_aliases: tuple[str, ...] = ()
    start_timeout_s: float = 900.0
    engine_keep_alive_s: int = ENGINE_KEEP_ALIVE_S
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeSettings:
        """Every bad setting at once, as one JobSpecError naming the variables."""
        env = dict(os.environ if env is None else env)
        problems: list[str] = []

        def get_int(name: str, default: int | None, low: int = 1) -> int | None:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not a whole number")
                return default
            if value < low:
                problems.append(f"{name}={value} must be at least {low}")
            return value

        def get_bool(name: str, default: bool) -> bool:
            raw = env.get(name, "").strip().lower()
            if not raw:
                return default
            if raw not in ("1", "0", "true", "false", "yes", "no"):
                problems.append(f"{name}={raw!r} must be true or false")
                return default
            return raw in ("1", "true", "yes")

        model = env.get("MODEL_NAME", "").strip()
        if not model:
            problems.append("MODEL_NAME is not set: give the base model (Hub id or local folder)")
        elif model.startswith(("/", "./", "~")) and not (Path(model).expanduser() / "config.json").is_file():
            problems.append(f"MODEL_NAME={model!r} is a path but holds no config.json: give a model folder or a Hub id")
        engine = env.get("FTW_SERVE_ENGINE", "auto").strip().lower() or "auto"
        if engine not in ENGINES:
            problems.append(f"FTW_SERVE_ENGINE={engine!r}: use one of {', '.join(ENGINES)}")
        gpu_util = None
        if env.get("GPU_MEMORY_UTILIZATION", "").strip():
            try:
                gpu_util = float(env["GPU_MEMORY_UTILIZATION"])
            except ValueError:
                problems.append("GPU_MEMORY_UTILIZATION must be a number such as 0.9")
        preload = _parse_preload(env.get("FTW_SERVE_ADAPTERS", ""), problems)
        cache_gb = env.get("FTW_SERVE_CACHE_GB", "").strip()
        try:
            cache_bytes = int(float(cache_gb) * 2**30) if cache_gb else 20 * 2**30
        except ValueError:
            problems.append(f"FTW_SERVE_CACHE_GB={cache_gb!r} is not a number")
            cache_bytes = 20 * 2**30
        max_loras = get_int("MAX_LORAS", 4)
        settings = cls(
            model=model,
            served_name=env.get("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "").strip() or model,
            engine=engine,
            python=env.get("FTW_SERVE_PYTHON", "").strip() or sys.executable,
            enable_lora=get_bool("ENABLE_LORA", True),
            max_loras=max_loras or 4,
            max_lora_rank=get_int("MAX_LORA_RANK", 64) or 64,
            max_cpu_loras=get_int("MAX_CPU_LORAS", max(16, max_loras or 4)) or 16,
            max_model_len=get_int("MAX_MODEL_LEN", None),
            max_num_seqs=get_int("MAX_NUM_SEQS", None),
            dtype=env.get("DTYPE", "").strip() or None,
            gpu_memory_utilization=gpu_util,
            tensor_parallel_size=get_int("TENSOR_PARALLEL_SIZE", None),
            enforce_eager=get_bool("ENFORCE_EAGER", False),
            seed=get_int("SEED", None, low=0),
            vllm_extra_args=tuple(shlex.split(env.get("VLLM_EXTRA_ARGS", ""))),
            max_concurrency=get_int("MAX_CONCURRENCY", None),
            preload=preload,
            cache_bytes=cache_bytes,
            base_aliases=tuple(a.strip() for a in env.get("FTW_SERVE_BASE_ALIASES", "").split(",") if a.strip()),
            start_timeout_s=float(get_int("FTW_SERVE_START_TIMEOUT_S", 900) or 900),
            engine_keep_alive_s=get_int("FTW_ENGINE_KEEP_ALIVE_S", ENGINE_KEEP_ALIVE_S) or ENGINE_KEEP_ALIVE_S,
            env=env,
        )
        if settings.max_cpu_loras < settings.max_loras:
            problems.append(f"MAX_CPU_LORAS={settings.max_cpu_loras} must be at least MAX_LORAS={settings.max_loras}")
        if problems:
            raise JobSpecError(
                "the serving worker's settings are invalid: " + "; ".join(problems),
                hint="fix these endpoint environment variables and restart the worker",
            )
        return settings

    def concurrency(self, engine: str) -> int:
        """Jobs one worker takes at once (RunPod's concurrency_modifier): what the engine batches.

        vLLM batches up to MAX_NUM_SEQS sequences; the transformers engine runs one request at a time,
        so two (one running, one queued behind it) keep it busy without holding jobs another worker could take.
        """
        if self.max_concurrency:
            return self.max_concurrency
        if engine == "transformers":
            return 2
        return self.max_num_seqs or 8

    def base_names(self) -> set[str]:
        """Names an adapter's `base_model_name_or_path` may carry to count as trained on our base."""
        names = {self.model, self.served_name, *self.base_aliases}
        if Path(self.model).is_dir():
            names.add(str(Path(self.model).resolve()))
        return {n.rstrip("/") for n in names}


def _parse_preload(raw: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        name, sep, ref = item.partition("=")
        if not sep or not name.strip() or not ref.strip():
            problems.append(f"FTW_SERVE_ADAPTERS entry {item!r} must look like name=ref")
            continue
        pairs.append((name.strip(), ref.strip()))
    return tuple(pairs)

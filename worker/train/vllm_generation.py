"""Completions from vLLM beside the trainer: the serving worker's engine (worker/serve/engine.py) as a child of
the train process, and the LoRA adapter synced into it.

Start: `vllm serve` on loopback with runtime LoRA loading, the base model the trainer loaded (local folder,
or Hub id at revision_of_model), its dtype, `trl.vllm_gpu_memory_utilization` of the GPU (on a GPU; the
CPU build sizes its KV cache as the serving worker does), a context of sequence_len + the completion
length. It starts before the first step and must answer /health within FTW_VLLM_START_TIMEOUT_S.

Sync (every `trl.vllm_sync_interval` optimizer steps, and before the first generation): the adapter is
saved to `<run>/vllm/adapters/step-<n>`, loaded under the new name `policy-<n>` through
`/v1/load_lora_adapter`, and the previous one unloaded and deleted; completions name the adapter they
want, so a request never runs on a half-synced engine. Between syncs the engine runs a policy up to
`vllm_sync_interval - 1` steps old (off-policy by that much, as in TRL).

Stop: the engine's process group ends with the train child, whatever ends it: `close()` (at the end of
training and at interpreter exit), and the kernel's parent-death signal (worker/lifeline.py) when the
child is killed outright. Its pid is written to `<run>/vllm/engine.pid` (the tests check it is gone).

Where vLLM lives: `FTW_VLLM_PYTHON` (a Python with vLLM, e.g. a separate venv), else this Python.
`VLLM_EXTRA_ARGS` adds `vllm serve` flags, as for the serving worker.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from schemas.config import TrainingConfig
from schemas.paths import is_local, local_path
from worker.errors import InfraError, JobSpecError, TrainingError
from worker.serve.engine import EngineProcess
from worker.serve.engine_defaults import vllm_build
from worker.serve.settings import ServeSettings
from worker.train.sampling import Sampling, VllmOptions, cut_at_stop

log = logging.getLogger(__name__)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
BASE_NAME = "ftw-base"
REQUEST_TIMEOUT_S = 3600.0
GROUP_EXIT_S = 30.0  # the engine's own children (engine core, workers) after its API server has exited
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def engine_settings(
    cfg: TrainingConfig, options: VllmOptions, dtype: str, env: dict[str, str], on_gpu: bool
) -> ServeSettings:
    """The engine's settings from the training config (pure: tested without starting anything)."""
    rank = cfg.lora_r or 8
    model = str(local_path(cfg.base_model)) if is_local(cfg.base_model) else cfg.base_model
    extra = shlex.split(env.get("VLLM_EXTRA_ARGS", ""))
    if not is_local(cfg.base_model) and cfg.revision_of_model:
        extra += ["--revision", cfg.revision_of_model]
    return ServeSettings(
        model=model,
        served_name=BASE_NAME,
        engine="vllm",
        python=env.get("FTW_VLLM_PYTHON", "").strip() or sys.executable,
        enable_lora=True,
        max_loras=1,  # one policy at a time; the outgoing one waits in the CPU cache until unloaded
        max_lora_rank=next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1]),
        max_cpu_loras=2,
        max_model_len=cfg.sequence_len + options.max_tokens,
        dtype=dtype,
        gpu_memory_utilization=options.gpu_memory_utilization if on_gpu else None,
        seed=cfg.seed,
        vllm_extra_args=tuple(extra),
        start_timeout_s=float(env.get("FTW_VLLM_START_TIMEOUT_S", "").strip() or 900),
        env=env,
    )


def model_dtype(model: torch.nn.Module) -> str:
    """The dtype of the trainer's base weights (the output embedding is never quantized)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return DTYPES.get(head.weight.dtype, "bfloat16")


class VllmGenerator:
    """vLLM as the train child's child; the policy's adapter synced into it."""

    name = "vllm"

    def __init__(self, cfg: TrainingConfig, model: torch.nn.Module, run_dir: Path | None, options: VllmOptions):
        if cfg.lora_r is None or not hasattr(model, "save_pretrained"):
            raise JobSpecError("trl.use_vllm syncs a LoRA adapter into the engine", hint="set adapter: lora")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise JobSpecError(
                    "trl.use_vllm runs one engine beside one training process; this run has "
                    f"{torch.distributed.get_world_size()}",
                    hint="train on one GPU (CUDA_VISIBLE_DEVICES) or remove trl.use_vllm",
                )
        self.model = model
        self.interval = options.sync_interval
        self.folder = Path(run_dir or ".").resolve() / "vllm"
        self.adapter: str | None = None  # the engine's name of the policy now generating
        self.synced_step = -1
        env = dict(os.environ)
        settings = engine_settings(cfg, options, model_dtype(model), env, torch.cuda.is_available())
        if vllm_build(settings.python) is None:
            raise InfraError(
                f"trl.use_vllm needs vLLM, and {settings.python} has none",
                hint="install vLLM in the worker image, point FTW_VLLM_PYTHON at a Python that has it, "
                "or remove trl.use_vllm (completions are then generated with transformers)",
                stage="train",
            )
        self.engine = EngineProcess(settings, engine="vllm", log_path=self.folder / "engine.log")
        atexit.register(self.close)
        log.info("starting vLLM for generation (%s)", self.engine.describe())
        try:
            self.engine.start()
        except InfraError as e:
            raise InfraError(
                f"vLLM for trl.use_vllm did not start: {e.message}",
                hint="lower trl.vllm_gpu_memory_utilization if the GPU is short of memory (or raise it if the engine "
                "found no room for its KV cache); an engine still loading when the time ran out: raise "
                f"FTW_VLLM_START_TIMEOUT_S (now {settings.start_timeout_s:.0f} s); read the engine log tail; "
                "trl.use_vllm: false generates with transformers instead",
                stage="train",
                log_tail=e.log_tail,
            ) from e
        assert self.engine.proc is not None
        (self.folder / "engine.pid").write_text(str(self.engine.proc.pid))
        log.info("vLLM answers at %s (log: %s)", self.engine.url, self.engine.log_path)

    # ---- weights ------------------------------------------------------------------------------
    def sync(self, step: int, force: bool = False) -> None:
        if self.adapter is not None and step == self.synced_step:
            return
        if self.adapter is not None and not force and step - self.synced_step < self.interval:
            return
        name = f"policy-{step}"
        folder = self.folder / "adapters" / f"step-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        self.model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
        try:
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        except TrainingError as e:
            raise TrainingError(
                f"vLLM refused the policy's adapter: {e.message}",
                hint="vLLM loads LoRA on linear layers only: remove lora_modules_to_save and keep lora_target_modules "
                "to projections, or set trl.use_vllm: false",
                stage="train",
                log_tail=self.engine.log_tail(),
            ) from e
        previous, self.adapter, self.synced_step = self.adapter, name, step
        if previous is not None:
            self._post("/v1/unload_lora_adapter", {"lora_name": previous})
            shutil.rmtree(self.folder / "adapters" / previous.replace("policy-", "step-"), ignore_errors=True)
        log.info("policy of step %d synced to vLLM as %s", step, name)

    # ---- generation ---------------------------------------------------------------------------
    def completions(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
        body: dict[str, Any] = {
            "model": self.adapter or BASE_NAME,
            "prompt": prompts,
            "n": sampling.n,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or 0,
            "min_p": sampling.min_p or 0.0,
            "repetition_penalty": sampling.repetition_penalty or 1.0,
            "ignore_eos": True,  # stop at stop_id alone, as transformers' generate does with eos_token_id
            "stop_token_ids": [sampling.stop_id],
            "return_token_ids": True,
        }
        choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) * sampling.n:
            raise TrainingError(
                f"vLLM answered {len(choices)} completions for {len(prompts)} prompts × {sampling.n}",
                stage="train",
                log_tail=self.engine.log_tail(),
            )
        for i, c in enumerate(choices):  # prompt-major, as vLLM numbers them: prompt index × n + sample
            if c.get("prompt_token_ids") not in (None, prompts[i // sampling.n]):
                raise TrainingError(f"vLLM's completion {i} is not of prompt {i // sampling.n}", stage="train")
        return [cut_at_stop(list(c["token_ids"]), sampling.stop_id) for c in choices]

    def _post(self, route: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.engine.url + route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                err = json.loads(detail)
                detail = (err.get("error") or err).get("message") or detail if isinstance(err, dict) else detail
            except (ValueError, AttributeError):
                pass
            raise TrainingError(f"vLLM refused {route}: {str(detail)[:500]}", stage="train") from e
        except OSError as e:
            alive = self.engine.alive()
            raise TrainingError(
                f"vLLM did not answer {route} ({type(e).__name__}: {e})"
                + ("" if alive else f"; the engine exited with code {self.engine.proc and self.engine.proc.poll()}"),
                hint="read the engine log tail (out of memory: lower trl.vllm_gpu_memory_utilization)",
                stage="train",
                log_tail=self.engine.log_tail(),
            ) from e
        try:
            return json.loads(text) if text else None
        except ValueError:
            return text  # load/unload_lora_adapter answer plain text

    def close(self) -> None:
        """Stop the engine and wait until its whole process group is gone, so that its memory is free for what
        follows (merging, the next job); idempotent: it runs at the end of training and again at exit."""
        if self.engine.proc is None or self.engine.stopping:
            return
        group = self.engine.proc.pid
        self.engine.stop()
        deadline = time.monotonic() + GROUP_EXIT_S
        while group_alive(group):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                break
            time.sleep(0.2)
        shutil.rmtree(self.folder / "adapters", ignore_errors=True)  # the trainer saves the adapter itself
        log.info("vLLM stopped")


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True

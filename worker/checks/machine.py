"""What a config needs from the machine it runs on, checked without importing torch or any of the
packages it asks about. It runs once per job, in the orchestrator's checks stage, right after the
GPU probe and before preprocessing, so a job this worker cannot train is refused before anything is
spent (the train child and the stage children share this worker's packages and get the environment
checked here)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

from schemas.config import TrainingConfig
from schemas.optimizers import OPTIMIZERS
from schemas.paths import is_local, resolve_local_path
from worker.errors import JobSpecError

# attn_implementation → (the module transformers imports for it, the package that has it)
FLASH_MODULES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def wandb_can_log_in(cfg: TrainingConfig, env: Mapping[str, str]) -> bool:
    """Offline and disabled runs need no account; an online run needs WANDB_API_KEY or a netrc entry."""
    mode = cfg.wandb_mode or env.get("WANDB_MODE") or "online"
    if mode in ("offline", "disabled", "dryrun") or env.get("WANDB_API_KEY"):
        return True
    netrc = Path(env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc")
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


# a folder holds a tokenizer when it has one of these (fast, sentencepiece, BPE/WordPiece vocabularies)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def local_inputs(cfg: TrainingConfig, datasets: bool) -> list[tuple[str, str]]:
    """(key, value) of every local file or folder the run reads (the datasets only when it still
    has to prepare them)."""
    named = [
        (key, getattr(cfg, key)) for key in ("base_model", "base_model_config", "tokenizer_config", "lora_model_dir")
    ]
    for list_key in ("datasets", "test_datasets", "pretraining_dataset") if datasets else ():
        named += [(f"{list_key}[{i}].path", ds.path) for i, ds in enumerate(getattr(cfg, list_key) or [])]
    return [(key, value) for key, value in named if isinstance(value, str) and is_local(value)]


def missing_local_inputs(cfg: TrainingConfig, env: Mapping[str, str], datasets: bool) -> list[tuple[str, str]]:
    """A local input that is not there, or a model folder without what loading it needs: found in
    milliseconds here instead of as a library's message from inside a stage."""
    problems: list[tuple[str, str]] = []
    where = "relative paths are read under BASE_VOLUME"
    for key, value in local_inputs(cfg, datasets):
        path = resolve_local_path(value, env)
        if not path.exists():
            problems.append((f"{key}: {value} does not exist on this worker ({path})", f"check {key} ({where})"))
    model = resolve_local_path(cfg.base_model, env) if is_local(cfg.base_model) else None
    if model is not None and model.is_dir():
        if not cfg.base_model_config and not (model / "config.json").is_file():
            problems.append(
                (
                    f"base_model: {cfg.base_model} has no config.json",
                    "point base_model at the folder that holds the model's config.json and weights",
                )
            )
        if not cfg.tokenizer_config and not any((model / name).is_file() for name in TOKENIZER_FILES):
            problems.append(
                (
                    f"base_model: {cfg.base_model} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …)",
                    "copy the tokenizer files into the model folder, "
                    "or set tokenizer_config to a folder or Hub id that has them",
                )
            )
    return problems


def check_machine(
    cfg: TrainingConfig,
    has_cuda: bool,
    env: Mapping[str, str],
    datasets: bool = False,
    capabilities: Sequence[str] = (),
) -> None:
    """JobSpecError listing every requirement of `cfg` this machine (and `env`, the environment the
    train child gets) does not meet, each with its fix; `datasets`: the local dataset files too;
    `capabilities`: the probed GPUs' compute capabilities ("9.0", "" where unknown)."""
    problems = missing_local_inputs(cfg, env, datasets)
    if cfg.fp8_base_weights:
        problems += fp8_problems(has_cuda, capabilities)
    if cfg.adapter == "qlora" or cfg.load_in_4bit or cfg.load_in_8bit:
        if not has_cuda:
            problems.append(
                (
                    "QLoRA / 4-bit / 8-bit loading needs a CUDA GPU (bitsandbytes), and this machine has none",
                    "use adapter: lora without load_in_4bit/load_in_8bit, or run on a GPU worker",
                )
            )
        elif not installed("bitsandbytes"):
            problems.append(
                ("load_in_4bit/load_in_8bit need bitsandbytes, which is not installed", "use adapter: lora")
            )
    problems += optimizer_problems(cfg.optimizer, has_cuda)
    impl = cfg.attention_backend()
    if impl in FLASH_MODULES and not installed(FLASH_MODULES[impl][0]):
        problems.append(
            (
                f"attn_implementation: {impl} needs the {FLASH_MODULES[impl][1]} package, "
                "which this worker does not have",
                "use attn_implementation: sdpa (packed samples stay separated) or flex_attention",
            )
        )
    missing = [name for name in cfg.trackers() if not installed(name)]
    if missing:
        problems.append(
            (
                f"{', '.join(missing)} logging is configured, but not installed in this worker",
                f"remove the {', '.join(missing)} keys, or use an image with the package",
            )
        )
    if "wandb" not in missing and "wandb" in cfg.trackers() and not wandb_can_log_in(cfg, env):
        problems.append(
            (
                "wandb logging is on (online) but no WANDB_API_KEY reaches the worker",
                "pass credentials.wandb_api_key with the job, set WANDB_API_KEY on the endpoint, "
                "or set wandb_mode: offline",
            )
        )
    if problems:
        raise JobSpecError("; ".join(m for m, _ in problems), hint="; ".join(h for _, h in problems))


def fp8_problems(has_cuda: bool, capabilities: Sequence[str]) -> list[tuple[str, str]]:
    """float8 tensor cores (`torch._scaled_mm`) need compute capability 8.9 (Ada) or later: Hopper, Blackwell;
    and one GPU (no DDP of the float8 weights yet). An unknown capability passes here; the train stage checks
    again with torch."""
    fix = "remove fp8_base_weights (a bf16 base), or run on an Ada/Hopper GPU (L4, L40S, RTX 4090, H100, H200)"
    if not has_cuda:
        return [("fp8_base_weights needs a CUDA GPU with float8 tensor cores, and this machine has none", fix)]
    problems = []
    older = sorted({c for c in capabilities if c and tuple(map(int, c.split("."))) < (8, 9)})
    if older:
        problems.append(
            (f"fp8_base_weights needs compute capability 8.9 or more, and this GPU has {', '.join(older)}", fix)
        )
    if len(capabilities) > 1:  # untested: DDP broadcasting float8 parameters (a Parameter subclass) at start-up
        problems.append(
            (
                f"fp8_base_weights trains on one GPU (not several yet), and this job sees {len(capabilities)}",
                "run it on a one-GPU worker, or remove fp8_base_weights",
            )
        )
    return problems


def optimizer_problems(name: str, has_cuda: bool) -> list[tuple[str, str]]:
    """What the registry says the optimizer needs (schemas/optimizers.py) that this machine lacks."""
    spec = OPTIMIZERS[name]
    missing = [f"no {package}" for package in spec.packages if not installed(package)]
    lacks = "no CUDA GPU" if spec.needs_cuda and not has_cuda else next(iter(missing), None)
    if lacks is None:
        return []
    return [
        (
            f"optimizer {name} needs {spec.requirement()}, and this machine has {lacks}",
            "use optimizer: adamw_torch_fused",
        )
    ]

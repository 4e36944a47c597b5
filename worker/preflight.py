"""What a config needs from the machine it runs on, checked without importing torch or any of the
packages it asks about. The job pipeline runs it right after the GPU probe, before preprocessing,
so a job this worker cannot train is refused before anything is spent; the train child runs it
again before loading (for `ftw train` on its own)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from schemas.config import TrainingConfig
from schemas.paths import is_local, resolve_local_path
from worker.errors import JobSpecError

# optimizer name → bitsandbytes.optim class (worker/train/optim.py builds them)
BNB_OPTIMIZERS = {
    "adamw_bnb_8bit": "AdamW8bit",
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
    "lion_8bit": "Lion8bit",
    "paged_lion_8bit": "PagedLion8bit",
}
# the rest that worker/train/optim.py builds (muon where torch has it)
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_hf", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor", "muon")


# attn_implementation → (the module transformers imports for it, the package that has it)
FLASH_MODULES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
}


def attention_backend(cfg: TrainingConfig) -> str:
    """The attn_implementation the model is loaded with (sdpa unless the config names one)."""
    return cfg.attn_implementation or "sdpa"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def wanted_trackers(cfg: TrainingConfig) -> list[str]:
    """The experiment trackers the config turns on, in axolotl's terms."""
    wanted = []
    if cfg.use_wandb or (cfg.use_wandb is None and cfg.wandb_project):
        wanted.append("wandb")
    if cfg.use_mlflow or (cfg.use_mlflow is None and cfg.mlflow_tracking_uri):
        wanted.append("mlflow")
    if cfg.use_tensorboard:
        wanted.append("tensorboard")
    return wanted


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
                    "copy the tokenizer files into the model folder, or set tokenizer_config to a folder or Hub id that has them",
                )
            )
    return problems


def check_machine(cfg: TrainingConfig, has_cuda: bool, env: Mapping[str, str], datasets: bool = False) -> None:
    """JobSpecError listing every requirement of `cfg` this machine (and `env`, the environment the
    train child gets) does not meet, each with its fix; `datasets`: the local dataset files too."""
    problems = missing_local_inputs(cfg, env, datasets)
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
    if cfg.optimizer in BNB_OPTIMIZERS and not (has_cuda and installed("bitsandbytes")):
        problems.append(
            (
                f"optimizer {cfg.optimizer} needs bitsandbytes on a CUDA GPU, and this machine has "
                + ("no CUDA GPU" if not has_cuda else "no bitsandbytes"),
                "use optimizer: adamw_torch_fused",
            )
        )
    elif cfg.optimizer not in BNB_OPTIMIZERS and cfg.optimizer not in TORCH_OPTIMIZERS:
        problems.append(
            (
                f"optimizer {cfg.optimizer} is not available in this build of ftw",
                "use adamw_torch_fused (or adamw_bnb_8bit on a GPU worker for 8-bit optimizer states)",
            )
        )
    impl = attention_backend(cfg)
    if impl in FLASH_MODULES and not installed(FLASH_MODULES[impl][0]):
        problems.append(
            (
                f"attn_implementation: {impl} needs the {FLASH_MODULES[impl][1]} package, which this worker does not have",
                "use attn_implementation: sdpa (packed samples stay separated) or flex_attention",
            )
        )
    missing = [name for name in wanted_trackers(cfg) if not installed(name)]
    if missing:
        problems.append(
            (
                f"{', '.join(missing)} logging is configured, but not installed in this worker",
                f"remove the {', '.join(missing)} keys, or use an image with the package",
            )
        )
    if "wandb" not in missing and "wandb" in wanted_trackers(cfg) and not wandb_can_log_in(cfg, env):
        problems.append(
            (
                "wandb logging is on (online) but no WANDB_API_KEY reaches the worker",
                "pass credentials.wandb_api_key with the job, set WANDB_API_KEY on the endpoint, or set wandb_mode: offline",
            )
        )
    if problems:
        raise JobSpecError("; ".join(m for m, _ in problems), hint="; ".join(h for _, h in problems))

"""The checks of `rl:` and its options (schemas/rl.py): rules between keys, dataset types, reward functions.

Rules are registered in schemas.rules' list (the same location-precise Issues as every other
rule); `check_rl_entry` runs per dataset entry from schemas.classify, `check_reward_funcs` from
schemas.validate (it needs the operator's environment: reward functions other than the
built-ins are user code, behind FTW_ALLOW_PLUGINS like plugins).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from schemas.config import TrainingConfig
from schemas.environment import env_flag
from schemas.issues import Issue, Report
from schemas.paths import find_module_file
from schemas.rl import (
    BUILTIN_REWARDS,
    DPO_LOSS_TYPES,
    EBFT_STRIDED_KEYS,
    EBFT_STRIDED_TYPES,
    EBFT_STRUCTURED_KEYS,
    EBFT_STRUCTURED_TYPES,
    NEEDS_REFERENCE,
    NOT_BUILT,
    PAIR_METHODS,
    RL_METHODS,
    TRL_NOT_BUILT,
    EbftConfig,
    TrlConfig,
    dataset_types,
)
from schemas.rules import Problems, rule

RL_ROW_FIELDS = ("field_prompt", "field_chosen", "field_rejected", "field_completion", "field_label", "field_answer")
VLLM_KEYS = {"vllm_mode", "vllm_sync_interval", "vllm_lora_sync", "vllm_gpu_memory_utilization"}
# options that belong to one method: set with another, they would silently do nothing
METHOD_KEYS = {
    "rl_beta": RL_METHODS,
    "dpo_loss_type": ("dpo", "ipo"),
    "dpo_label_smoothing": ("dpo", "ipo"),
    "orpo_alpha": ("orpo",),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
    "trl": ("grpo", "ebft"),
    "ebft": ("ebft",),
}


@rule("rl")
def _method(cfg: TrainingConfig) -> Problems:
    if cfg.rl is None or cfg.rl in RL_METHODS:
        return
    if cfg.rl in NOT_BUILT:
        yield Issue(
            "rl",
            f"rl: {cfg.rl} ({NOT_BUILT[cfg.rl]}) is not supported by ftw; supported: {', '.join(RL_METHODS)}",
            "unsupported",
        )
    else:
        yield Issue("rl", f"rl: {cfg.rl!r} is not a known method; use one of {', '.join(RL_METHODS)}")


@rule("rl", *METHOD_KEYS)
def _method_keys(cfg: TrainingConfig) -> Problems:
    if cfg.rl is not None and cfg.rl not in RL_METHODS:
        return  # the rl error says what to change
    for key, methods in METHOD_KEYS.items():
        value = getattr(cfg, key)
        # set, and not to its default: a config written back in full (a run's config.json) names every key
        if (
            key in cfg.model_fields_set
            and value is not None
            and value != TrainingConfig.model_fields[key].default
            and cfg.rl not in methods
        ):
            now = f"rl is {cfg.rl}" if cfg.rl else "rl is not set"
            yield Issue(key, f"{key} applies to rl: {' / '.join(methods)} ({now}); remove it or set rl")


@rule("rl", "dpo_loss_type")
def _dpo_loss_type(cfg: TrainingConfig) -> Problems:
    kinds = cfg.dpo_loss_type or []
    unknown = [k for k in kinds if k not in DPO_LOSS_TYPES]
    if unknown:
        yield Issue(
            "dpo_loss_type",
            f"dpo_loss_type {unknown[0]!r} is not supported by ftw; use one of {', '.join(DPO_LOSS_TYPES)}",
            "unsupported",
        )
    elif len(kinds) > 1:
        yield Issue(
            "dpo_loss_type", "a weighted mix of DPO losses is not supported by ftw; give one loss type", "unsupported"
        )


@rule("rl", "adapter")
def _reference_model(cfg: TrainingConfig) -> Problems:
    if cfg.rl in NEEDS_REFERENCE and cfg.adapter is None and (cfg.rl != "grpo" or cfg.rl_beta_value() > 0):
        yield Issue(
            "rl",
            (
                f"rl: {cfg.rl} with full fine-tuning would need a second copy of the model as the reference; "
                "ftw uses the base model with the adapter disabled: set adapter: lora (or qlora)"
                + (", or use rl: orpo / simpo (no reference)" if cfg.rl != "grpo" else ", or trl.beta: 0")
            ),
            "unsupported",
        )


@rule("rl", "pretraining_dataset")
def _rl_data(cfg: TrainingConfig) -> Problems:
    if cfg.rl and cfg.pretraining_dataset:
        yield Issue(
            "pretraining_dataset",
            f"rl: {cfg.rl} trains on preference/prompt datasets under datasets:, not pretraining_dataset",
        )


@rule("rl", "max_prompt_len", "sequence_len")
def _prompt_len(cfg: TrainingConfig) -> Problems:
    if cfg.max_prompt_len is not None and cfg.max_prompt_len >= cfg.sequence_len:
        yield Issue(
            "max_prompt_len",
            f"max_prompt_len {cfg.max_prompt_len} leaves no room for a completion within "
            f"sequence_len {cfg.sequence_len}",
        )


@rule("rl", "trl", "ebft")
def _grpo(cfg: TrainingConfig) -> Problems:
    """GRPO's trl: block, and EBFT structured mode's (its generation and policy loss are GRPO's)."""
    ebft = cfg.ebft or EbftConfig()
    if cfg.rl != "grpo" and (cfg.rl != "ebft" or ebft.mode != "structured"):
        return
    trl = cfg.trl or TrlConfig()
    if cfg.rl == "ebft":
        if trl.reward_funcs or trl.reward_weights:
            key = "trl.reward_funcs" if trl.reward_funcs else "trl.reward_weights"
            yield Issue(
                key, f"{key}: rl: ebft rewards completions by feature matching (ebft:), not reward functions; remove it"
            )
    elif not trl.reward_funcs:
        yield Issue(
            "trl.reward_funcs",
            "rl: grpo needs reward functions: trl.reward_funcs, e.g. [exact_match] "
            f"(built-ins: {', '.join(BUILTIN_REWARDS)}; your own: module.function)",
        )
    if cfg.rl == "grpo" and trl.reward_weights is not None and len(trl.reward_weights) != len(trl.reward_funcs or []):
        yield Issue(
            "trl.reward_weights",
            f"trl.reward_weights has {len(trl.reward_weights)} weights for {len(trl.reward_funcs or [])} "
            "reward functions; give one per function",
        )
    if trl.reward_regex is not None:
        try:
            re.compile(trl.reward_regex)
        except re.error as e:
            yield Issue("trl.reward_regex", f"trl.reward_regex is not a valid regular expression: {e}")
    if trl.use_vllm:
        yield from _vllm(cfg, trl)
    else:
        for key in sorted(VLLM_KEYS & trl.model_fields_set):
            if getattr(trl, key) != TrlConfig.model_fields[key].default:
                yield Issue(f"trl.{key}", f"trl.{key} applies to vLLM generation: set trl.use_vllm: true or remove it")
    if trl.num_iterations > 1:
        yield Issue(
            "trl.num_iterations",
            "trl.num_iterations above 1 (reusing a generation batch) is not supported by ftw; remove it",
            "unsupported",
        )
    for key in sorted(trl.model_extra or {}):
        if key in TRL_NOT_BUILT:
            yield Issue(
                f"trl.{key}", f"trl.{key} is not supported by ftw ({TRL_NOT_BUILT[key]}); remove it", "unsupported"
            )
        else:
            close = difflib.get_close_matches(key, [*TrlConfig.model_fields, *TRL_NOT_BUILT], n=1, cutoff=0.75)
            yield Issue(
                f"trl.{key}", f"unknown key {key!r} in trl" + (f"; did you mean {close[0]!r}?" if close else "")
            )


def _vllm(cfg: TrainingConfig, trl: TrlConfig) -> Problems:
    """trl.use_vllm: ftw starts vLLM itself beside the trainer and syncs the LoRA adapter into it."""
    if cfg.adapter is None:
        yield Issue(
            "trl.use_vllm",
            "trl.use_vllm with full fine-tuning would need the full weights copied into the engine every sync; "
            "ftw syncs LoRA adapters only: set adapter: lora (or qlora), or remove trl.use_vllm",
            "unsupported",
        )
    if trl.vllm_mode == "server":
        yield Issue(
            "trl.vllm_mode",
            "trl.vllm_mode: server (an external `trl vllm-serve`) is not supported by ftw; it starts its own engine "
            "on the training GPU: remove vllm_mode or set colocate",
            "unsupported",
        )
    if trl.vllm_lora_sync is False:
        yield Issue(
            "trl.vllm_lora_sync",
            "trl.vllm_lora_sync: false (merged weights copied into the engine) is not supported by ftw; it loads the "
            "LoRA adapter into the engine: remove the key",
            "unsupported",
        )


@rule("rl", "ebft", "trl", "datasets", "torch_compile", "sequence_len", "adapter")
def _ebft(cfg: TrainingConfig) -> Problems:
    """The ebft: block: its keys, which mode each belongs to, and what one sample per prompt allows."""
    if cfg.rl != "ebft":
        return
    ebft = cfg.ebft or EbftConfig()
    for key in sorted(ebft.model_extra or {}):
        close = difflib.get_close_matches(key, list(EbftConfig.model_fields), n=1, cutoff=0.75)
        yield Issue(f"ebft.{key}", f"unknown key {key!r} in ebft" + (f"; did you mean {close[0]!r}?" if close else ""))
    other, other_mode = (
        (EBFT_STRUCTURED_KEYS, "structured") if ebft.mode == "strided" else (EBFT_STRIDED_KEYS, "strided")
    )
    for key in other:
        if key in ebft.model_fields_set and getattr(ebft, key) != EbftConfig.model_fields[key].default:
            yield Issue(
                f"ebft.{key}",
                f"ebft.{key} applies to ebft.mode: {other_mode} (mode is {ebft.mode}); remove it or set the mode",
            )
    samples = ebft.samples(cfg.trl)
    if samples == 1 and ebft.advantage_estimator in ("rloo", "group_norm"):
        yield Issue(
            "ebft.advantage_estimator",
            f"ebft.advantage_estimator {ebft.advantage_estimator} needs at least 2 samples per prompt "
            "(ebft.n_samples_per_prompt is 1): use reinforce, or raise n_samples_per_prompt",
        )
    if samples == 1 and ebft.diversity_coef:
        yield Issue(
            "ebft.diversity_coef",
            "ebft.diversity_coef compares a prompt's samples with each other and ebft.n_samples_per_prompt is 1: "
            "set it to 0, or raise n_samples_per_prompt",
        )
    if ebft.rl_coef == 0 and ebft.ce_coef == 0:
        yield Issue("ebft.rl_coef", "ebft.rl_coef and ebft.ce_coef are both 0: nothing would be trained; raise one")
    for i, depth in enumerate(ebft.feature_layers):
        if not 0.0 <= depth <= 1.0:
            yield Issue(
                f"ebft.feature_layers[{i}]",
                "ebft.feature_layers are fractions of the model's depth (0.0 the embeddings, 1.0 the last layer); "
                f"got {depth}",
            )
    if cfg.adapter is None and (cfg.fsdp or cfg.fsdp_config or cfg.deepspeed):
        yield Issue(
            "adapter",
            "rl: ebft with full fine-tuning keeps a frozen copy of the model for its features, which ftw builds on "
            "one GPU only: set adapter: lora (the features then come from the base with the adapter disabled), "
            "or drop fsdp/deepspeed",
            "unsupported",
        )
    yield from _ebft_mode(cfg, ebft)


def _ebft_mode(cfg: TrainingConfig, ebft: EbftConfig) -> Problems:
    this, that = ebft.mode, "structured" if ebft.mode == "strided" else "strided"
    types, other = (
        (EBFT_STRIDED_TYPES, EBFT_STRUCTURED_TYPES)
        if ebft.mode == "strided"
        else (EBFT_STRUCTURED_TYPES, EBFT_STRIDED_TYPES)
    )
    for i, ds in enumerate(cfg.datasets or []):
        if isinstance(ds.type, str) and ds.type in other:
            yield Issue(
                f"datasets[{i}].type",
                f"type {ds.type} is a dataset type of ebft.mode: {that}; "
                f"with mode {this} use one of {', '.join(types)}",
            )
    if ebft.mode != "strided":
        return
    if cfg.trl is not None and "trl" in cfg.model_fields_set:
        yield Issue(
            "trl",
            "trl: configures structured mode's generation; strided mode samples with ebft.n_samples_per_prompt, "
            "temperature, top_p and generate_max_len: remove trl or set ebft.mode: structured",
        )
    if cfg.torch_compile is True:
        yield Issue(
            "torch_compile",
            "torch_compile with ebft.mode: strided is not supported by ftw (flex attention compiles its own kernels "
            "and a compiled model around it recompiles at every block mask); remove torch_compile",
            "unsupported",
        )
    if cfg.sequence_len < ebft.context_length + ebft.generate_max_len:
        yield Issue(
            "sequence_len",
            f"sequence_len {cfg.sequence_len} leaves no anchor: a strided block needs ebft.context_length "
            f"({ebft.context_length}) tokens before it and generate_max_len ({ebft.generate_max_len}) after",
        )


def check_rl_entry(entry: Mapping[str, Any], loc: str, rl: Any, report: Report) -> None:
    """A dataset entry of an rl config: its type must be one its method reads."""
    if rl not in RL_METHODS:
        return
    kind = entry.get("type")
    known = dataset_types(rl)
    if isinstance(kind, Mapping):
        if rl not in PAIR_METHODS:
            report.error(
                f"{loc}.type",
                f"the dict form of type is for preference pairs (rl: {', '.join(PAIR_METHODS)}); "
                f"for rl: {rl} use one of {', '.join(known)}",
            )
    elif kind is None:
        report.error(
            f"{loc}.type",
            f"rl: {rl} needs a dataset type: one of {', '.join(known)}"
            + (", or the dict form" if rl in PAIR_METHODS else ""),
        )
    elif isinstance(kind, str) and kind not in known:
        close = difflib.get_close_matches(kind, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        report.error(
            f"{loc}.type",
            f"type {kind!r} is not a dataset type of rl: {rl}{hint} (supported: {', '.join(known)})",
            "unsupported",
        )


def check_reward_funcs(cfg: Mapping[str, Any], env: Mapping[str, str], report: Report) -> None:
    """trl.reward_funcs: built-in names pass; anything else is user code, `module.function` with the module's file
    under BASE_VOLUME or FTW_ALLOWED_PATHS, and only where the operator sets FTW_ALLOW_PLUGINS."""
    trl = cfg.get("trl")
    funcs = trl.get("reward_funcs") if isinstance(trl, Mapping) else None
    if not isinstance(funcs, list):
        return
    for i, name in enumerate(funcs):
        if not isinstance(name, str) or name in BUILTIN_REWARDS:
            continue
        loc = f"trl.reward_funcs[{i}]"
        module, _, function = name.rpartition(".")
        if not module:
            close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1, cutoff=0.6)
            report.error(
                loc,
                f"trl.reward_funcs: {name!r} is not a built-in reward function"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + f" (built-ins: {', '.join(BUILTIN_REWARDS)}; your own: module.function)",
            )
        elif not env_flag(env, "FTW_ALLOW_PLUGINS"):
            report.error(
                loc,
                f"trl.reward_funcs: {name!r} names a Python module, which would run code on the worker; refused "
                f"unless the endpoint operator sets FTW_ALLOW_PLUGINS=1 (built-ins: {', '.join(BUILTIN_REWARDS)})",
                "gated",
            )
        elif not function.isidentifier() or find_module_file(module, env) is None:
            report.error(
                loc,
                f"trl.reward_funcs: {name!r} must be module.function with the module's file "
                f"({module.replace('.', '/')}.py) under BASE_VOLUME or a folder of FTW_ALLOWED_PATHS; none holds it",
            )

"""Sort every key of a (normalised) config into typed, no-effect, unsupported, gated or unknown.

Returns new dicts holding only typed keys; the rest become warnings (no effect, unknown with a
"did you mean") or errors that name the key (unsupported, gated). Dataset entries get the same
treatment with their own registries, and their `type` is checked against the strategies ftw has.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from schemas.config import LEGACY_ATTENTION_FLAGS, TrainingConfig
from schemas.datasets import KNOWN_UNSUPPORTED_TYPES, SUPPORTED_TYPES, DatasetConfig, PretrainingDatasetConfig
from schemas.environment import env_flag
from schemas.issues import Report, format_loc
from schemas.keys import (
    ALIASES,
    DATASET_UNSUPPORTED,
    GATED,
    KERNEL_SWITCHES,
    NATIVE_PLUGINS,
    NO_EFFECT,
    TORCH_DTYPE_KEY,
    UNSUPPORTED,
    is_off,
    unsupported_reason,
)
from schemas.limits import EXCERPT_CHARS, excerpt
from schemas.rl_rules import RL_ROW_FIELDS, check_rl_entry
from schemas.secrets import CREDENTIAL_ENV, secret_key

TYPED_FIELDS = frozenset(TrainingConfig.model_fields)
ALL_KNOWN = (
    TYPED_FIELDS
    | set(ALIASES)
    | set(NO_EFFECT)
    | set(KERNEL_SWITCHES)
    | set(UNSUPPORTED)
    | set(GATED)
    | set(LEGACY_ATTENTION_FLAGS)
    | {TORCH_DTYPE_KEY}
)
DATASET_LISTS: dict[str, type[BaseModel]] = {
    "datasets": DatasetConfig,
    "test_datasets": DatasetConfig,
    "pretraining_dataset": PretrainingDatasetConfig,
}
# where ftw decides itself: accepted as typed fields (others read them), but the job's value is not used
CREDENTIALS_HINT = (
    f"a credential goes under the job's credentials ({', '.join(CREDENTIAL_ENV)}) or in the endpoint's "
    "environment (HF_TOKEN, WANDB_API_KEY, AWS_*)"
)
FTW_DECIDES = {
    "output_dir": "a job (ftw run, the endpoint) writes to BASE_VOLUME/runs/<run_id>; only `ftw train` uses output_dir"
}


def did_you_mean(key: object, known: Iterable[str]) -> str:
    if not isinstance(key, str) or len(key) > EXCERPT_CHARS:  # no key that long is a typo of a known one
        return ""
    return _closest(key, tuple(sorted(known)))


def warn_unknown(key: str, known: Iterable[str], report: Report) -> None:
    """An unknown key is ignored; one that looks like a credential is not echoed with a typo hint."""
    if secret_key(key):
        report.warn(
            key,
            f"unknown key {excerpt(key)} looks like a credential: it is ignored and its value is not "
            f"kept; {CREDENTIALS_HINT}",
        )
    else:
        report.warn(key, f"unknown key {excerpt(key)} is ignored{did_you_mean(key, known)}")


@functools.lru_cache(maxsize=1024)  # a list of 10,000 entries repeats the same typo 10,000 times
def _closest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def classify_keys(cfg: Mapping[str, Any], env: Mapping[str, str], report: Report) -> dict[str, Any]:
    """The typed keys of `cfg`; every other key is reported."""
    clean: dict[str, Any] = {}
    for key, value in cfg.items():
        if not isinstance(key, str) or not key.strip():
            report.error(format_loc([str(key)]), f"config keys must be non-empty strings, got {excerpt(key)}")
        elif key in GATED:
            _gated(key, value, env, clean, report)
        elif key in TYPED_FIELDS:  # before the prefixes: dpo_loss_type is typed, other dpo_* keys are not
            if key in FTW_DECIDES and value is not None:
                report.warn(key, f"{key} is set by ftw: {FTW_DECIDES[key]}; the job's value is not used")
            clean[key] = value
        elif (reason := unsupported_reason(key)) is not None:
            if not is_off(value):
                shown = (
                    f"{key}: {value if len(value) <= EXCERPT_CHARS else excerpt(value)}"
                    if isinstance(value, str)
                    else key
                )
                report.error(key, f"{shown} is not supported by ftw ({reason}); remove it", "unsupported")
        elif key in NO_EFFECT:
            report.warn(key, f"{key} has no effect in ftw: {NO_EFFECT[key]}")
        elif key in KERNEL_SWITCHES:
            if not is_off(value):
                report.warn(key, f"{key}: {KERNEL_SWITCHES[key]}")
        else:
            warn_unknown(key, ALL_KNOWN, report)
    return clean


def _gated(key: str, value: Any, env: Mapping[str, str], clean: dict[str, Any], report: Report) -> None:
    if is_off(value):
        return
    if key == "plugins" and isinstance(value, list) and all(isinstance(p, str) and p in NATIVE_PLUGINS for p in value):
        for plugin in value:
            report.warn(key, f"plugin {plugin} is not loaded: {NATIVE_PLUGINS[plugin]}")
        return
    if not env_flag(env, GATED[key]):
        report.error(
            key,
            f"{key} runs code on the worker and is refused; the endpoint operator can allow it with {GATED[key]}=1",
            "gated",
        )
    elif key in TYPED_FIELDS:
        clean[key] = value
    else:
        report.error(
            key,
            f"{key} is allowed by the operator ({GATED[key]}), but ftw does not load plugins or extra module paths",
            "unsupported",
        )


def classify_dataset_lists(cfg: Mapping[str, Any], env: Mapping[str, str], report: Report) -> dict[str, Any]:
    """`cfg` with each dataset entry reduced to its typed keys (entries that are not mappings are left to pydantic).

    With `rl` set, a dataset's type is checked against that method's types (schemas/rl.py); with an
    `rl` ftw does not know, types are not checked (the rl error says what to change)."""
    out = dict(cfg)
    rl = cfg.get("rl")
    for list_key, model in DATASET_LISTS.items():
        entries = cfg.get(list_key)
        if isinstance(entries, list):
            out[list_key] = [
                _classify_entry(ds, model, format_loc([list_key, i]), env, report, rl)
                if isinstance(ds, Mapping)
                else ds
                for i, ds in enumerate(entries)
            ]
    return out


def _classify_entry(
    ds: Mapping[str, Any], model: type[BaseModel], loc: str, env: Mapping[str, str], report: Report, rl: Any = None
) -> dict[str, Any]:
    fields = model.model_fields
    clean: dict[str, Any] = {}
    for key, value in ds.items():
        where = f"{loc}.{key}"
        if not isinstance(key, str) or not key.strip():
            report.error(loc, f"dataset keys must be non-empty strings, got {excerpt(key)}")
        elif key in DATASET_UNSUPPORTED:
            if not is_off(value):
                report.error(
                    where, f"{key} is not supported by ftw ({DATASET_UNSUPPORTED[key]}); remove it", "unsupported"
                )
        elif key in fields:
            if value is not None or fields[key].default is None:
                clean[key] = value
        else:
            report.warn(
                where,
                f"unknown dataset key {excerpt(key)} is "
                f"ignored{did_you_mean(key, list(fields) + list(DATASET_UNSUPPORTED))}",
            )
    if model is DatasetConfig and rl:
        check_rl_entry(clean, loc, rl, report)
    elif model is DatasetConfig:
        _check_type(clean.get("type"), f"{loc}.type", env, report)
        for key in RL_ROW_FIELDS:
            if clean.get(key) is not None:
                report.error(
                    f"{loc}.{key}",
                    f"{key} is a key of preference/RL datasets; set rl (dpo, ipo, orpo, kto, simpo, grpo) or remove it",
                )
        jinja = clean.get("chat_template_jinja")
        if isinstance(jinja, str) and jinja.strip().endswith((".jinja", ".j2")):
            report.error(f"{loc}.chat_template_jinja", "chat_template_jinja must be the template text, not a file path")
    return clean


def _check_type(kind: Any, loc: str, env: Mapping[str, str], report: Report) -> None:
    if not isinstance(kind, str) or kind in SUPPORTED_TYPES:
        return
    base = kind.split(":")[0]
    family = base.split(".")[0]
    if family.startswith("sharegpt"):
        report.error(
            loc,
            f"type {excerpt(kind)} was removed from axolotl; use type: chat_template with field_messages "
            "(and message_property_mappings for from/value keys)",
            "unsupported",
        )
    elif family.startswith("ebft"):
        report.error(loc, f"type {excerpt(kind)} is a dataset type of rl: ebft; set rl: ebft (and its ebft: block)")
    elif family == "pretrain":
        report.error(loc, "type 'pretrain' belongs to pretraining_dataset entries; under datasets use type: completion")
    elif family in KNOWN_UNSUPPORTED_TYPES:
        report.error(
            loc,
            f"type {excerpt(kind)}: this prompt strategy is not supported by ftw; supported: "
            f"{', '.join(SUPPORTED_TYPES)}",
            "unsupported",
        )
    elif "." in kind:
        if not env_flag(env, "FTW_ALLOW_PLUGINS"):
            report.error(
                loc,
                f"type {excerpt(kind)} names a Python module, which would run code on the worker; "
                "refused unless the endpoint operator sets FTW_ALLOW_PLUGINS=1",
                "gated",
            )
        else:
            report.error(loc, f"type {excerpt(kind)}: custom strategy modules are not supported by ftw", "unsupported")
    else:
        report.error(
            loc,
            f"type {excerpt(kind)} is not a known prompt strategy{did_you_mean(kind, SUPPORTED_TYPES)} "
            f"(known: {', '.join(SUPPORTED_TYPES)}, or the dict form)",
        )

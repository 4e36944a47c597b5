"""Validate a raw training config (dict from YAML/JSON) into a TrainingConfig, collecting every issue.

Order: operator defaults/overrides (environment) → key normalisation (aliases, legacy attention
flags) → key classification (unknown, no-effect, unsupported, gated) → typed fields → dataset
strategies and local paths → cross-field rules. Imports nothing heavy: it runs in the
orchestrator and in `ftw validate`, before anything is spent.
"""
from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from schemas.config import LEGACY_ATTENTION_FLAGS, TrainingConfig, cross_field_errors
from schemas.datasets import KNOWN_UNSUPPORTED_TYPES, SUPPORTED_TYPES
from schemas.issues import Issue, Report, format_loc, pydantic_issues
from schemas.keys import ALIASES, GATED, NO_EFFECT, UNSUPPORTED, UNSUPPORTED_PREFIXES, is_off
from schemas.paths import check_local_path

KNOWN_FIELDS = frozenset(TrainingConfig.model_fields)
ALL_KNOWN = KNOWN_FIELDS | set(ALIASES) | set(NO_EFFECT) | set(UNSUPPORTED) | set(GATED) | set(LEGACY_ATTENTION_FLAGS)
TRUTHY = ("1", "true", "yes", "on")


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return (env.get(name) or "").strip().lower() in TRUTHY


def operator_layers(env: Mapping[str, str], report: Report) -> tuple[dict[str, Any], dict[str, Any]]:
    """FTW_CONFIG_DEFAULTS (under the job) and FTW_CONFIG_OVERRIDES (over it): JSON objects."""
    layers = []
    for name in ("FTW_CONFIG_DEFAULTS", "FTW_CONFIG_OVERRIDES"):
        text = env.get(name) or ""
        try:
            value = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            report.error(name, f"environment variable {name} is not valid JSON ({e.msg}); the endpoint operator must fix it")
            value = {}
        if not isinstance(value, dict):
            report.error(name, f"environment variable {name} must be a JSON object")
            value = {}
        layers.append(value)
    return layers[0], layers[1]


def normalize_keys(raw: Mapping[str, Any], report: Report) -> dict[str, Any]:
    """A new dict with axolotl's aliases and legacy flags mapped onto current keys."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ALIASES and ALIASES[key]:
            target = ALIASES[key]
            if target in raw:
                report.warn(key, f"{key} is an alias of {target}, which is also set; {target} wins")
                continue
            out[target] = value
        elif key == "torch_dtype":
            if value in ("bfloat16", "bf16") and "bf16" not in raw:
                out["bf16"] = True
            elif value in ("float16", "fp16") and "fp16" not in raw:
                out["fp16"] = True
        elif key in LEGACY_ATTENTION_FLAGS:
            impl = LEGACY_ATTENTION_FLAGS[key]
            if is_off(value):
                continue
            if impl is None:
                report.error(key, f"{key} is not supported: {UNSUPPORTED[key]}")
            elif raw.get("attn_implementation") not in (None, impl):
                report.error(key, f"{key}: true conflicts with attn_implementation: {raw['attn_implementation']}; keep one")
            else:
                out["attn_implementation"] = impl
        else:
            out[key] = value
    return out


def classify_keys(cfg: dict[str, Any], env: Mapping[str, str], report: Report) -> dict[str, Any]:
    """Drop (with a warning or an error) every key that is not a typed field."""
    clean: dict[str, Any] = {}
    for key, value in cfg.items():
        if not isinstance(key, str):
            report.error(str(key), "config keys must be strings")
        elif key in GATED:
            if is_off(value):
                continue
            if not env_flag(env, GATED[key]):
                report.error(key, f"{key} runs code on the worker and is refused; the endpoint operator can allow it with {GATED[key]}=1")
            elif key in KNOWN_FIELDS:
                clean[key] = value
            else:
                report.error(key, f"{key} is allowed by the operator, but ftw does not load plugins or extra module paths")
        elif key in KNOWN_FIELDS:
            clean[key] = value
        elif key in NO_EFFECT:
            report.warn(key, f"{key} has no effect in ftw: {NO_EFFECT[key]}")
        elif key in UNSUPPORTED or any(key.startswith(p) for p in UNSUPPORTED_PREFIXES):
            reason = UNSUPPORTED.get(key) or next(v for p, v in UNSUPPORTED_PREFIXES.items() if key.startswith(p))
            if not is_off(value):
                report.error(key, f"{key} is not supported by ftw ({reason}); remove it")
        else:
            close = difflib.get_close_matches(key, sorted(ALL_KNOWN), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            report.warn(key, f"unknown key {key!r} is ignored{hint}")
    return clean


def check_dataset_types(cfg: dict[str, Any], env: Mapping[str, str], report: Report) -> None:
    for list_key in ("datasets", "test_datasets"):
        entries = cfg.get(list_key)
        if not isinstance(entries, list):
            continue
        for i, ds in enumerate(entries):
            if not isinstance(ds, dict):
                continue
            loc = format_loc([list_key, i, "type"])
            kind = ds.get("type")
            if isinstance(kind, str):
                base = kind.split(":")[0]
                if base.startswith("sharegpt"):
                    report.error(loc, f"type {kind!r} was removed from axolotl; use type: chat_template with field_messages (and message_property_mappings for from/value keys)")
                elif kind in SUPPORTED_TYPES:
                    pass
                elif base.split(".")[0] in KNOWN_UNSUPPORTED_TYPES or base in KNOWN_UNSUPPORTED_TYPES:
                    report.error(loc, f"prompt strategy {kind!r} is not supported by ftw; supported: {', '.join(SUPPORTED_TYPES)}")
                elif "." in kind:
                    if not env_flag(env, "FTW_ALLOW_PLUGINS"):
                        report.error(loc, f"type {kind!r} names a Python module, which would run code on the worker; refused unless the endpoint operator sets FTW_ALLOW_PLUGINS=1")
                    else:
                        report.error(loc, f"custom strategy module {kind!r} is not implemented by ftw")
                else:
                    report.error(loc, f"unknown prompt strategy {kind!r}; use one of {', '.join(SUPPORTED_TYPES)} or the dict form")
            if isinstance(ds.get("chat_template_jinja"), str) and ds["chat_template_jinja"].strip().endswith((".jinja", ".j2")):
                report.error(format_loc([list_key, i, "chat_template_jinja"]), "chat_template_jinja must be the template text, not a file path")


def check_paths(cfg: dict[str, Any], env: Mapping[str, str], report: Report) -> None:
    candidates: list[tuple[str, Any]] = [(k, cfg.get(k)) for k in ("base_model", "base_model_config", "tokenizer_config", "lora_model_dir", "dataset_prepared_path", "resume_from_checkpoint")]
    for list_key in ("datasets", "test_datasets", "pretraining_dataset"):
        entries = cfg.get(list_key)
        if isinstance(entries, list):
            for i, ds in enumerate(entries):
                if isinstance(ds, dict):
                    candidates.append((format_loc([list_key, i, "path"]), ds.get("path")))
                    files = ds.get("data_files")
                    for j, f in enumerate(files if isinstance(files, list) else [files] if files else []):
                        candidates.append((format_loc([list_key, i, "data_files", j]), f))
    for loc, value in candidates:
        if isinstance(value, str):
            problem = check_local_path(value, env)
            if problem:
                report.error(loc, problem)


def validate_config(raw: Any, env: Mapping[str, str] | None = None) -> Report:
    """Every problem of a training config at once; `report.value` is the TrainingConfig when valid."""
    env = os.environ if env is None else env
    report = Report()
    if not isinstance(raw, Mapping):
        report.error("", f"a training config must be a mapping of keys to values, got {type(raw).__name__}")
        return report
    defaults, overrides = operator_layers(env, report)
    for key, value in overrides.items():
        if key in raw and raw[key] != value:
            report.warn(key, f"the endpoint operator fixes {key} to {value!r}; the job's value is not used")
    layered = {**defaults, **dict(raw), **overrides}
    cfg = classify_keys(normalize_keys(layered, report), env, report)
    check_dataset_types(cfg, env, report)
    check_paths(cfg, env, report)
    try:
        model = TrainingConfig.model_validate(cfg)
    except ValidationError as e:
        report.errors += pydantic_issues(e)
        return report
    report.errors += [Issue(loc, msg) for loc, msg in cross_field_errors(model)]
    if report.valid:
        report.value = model
    return report

"""Validate a raw training config (dict from YAML/JSON) into a TrainingConfig, collecting every issue.

Order: operator defaults/overrides (schemas.environment) → key normalisation (schemas.normalize)
→ key classification (schemas.classify) → local paths (schemas.paths) → typed fields →
cross-field rules (schemas.rules). Every stage reports and goes on, so one run shows every
problem; the rules run even when some fields are wrong, skipping only the rules that read a
wrong field. Imports nothing heavy: it runs in the orchestrator and in `ftw validate`, before
anything is spent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from schemas.classify import DATASET_LISTS, classify_dataset_lists, classify_keys
from schemas.config import TrainingConfig
from schemas.environment import operator_layers
from schemas.hosts import check_url
from schemas.issues import Issue, Report, format_loc, pydantic_issues
from schemas.limits import shape_problem
from schemas.normalize import normalize_keys
from schemas.paths import check_local_path
from schemas.rl_rules import check_reward_funcs
from schemas.rules import cross_field_errors, unfused_lora_warnings

PATH_KEYS = (
    "base_model",
    "base_model_config",
    "tokenizer_config",
    "lora_model_dir",
    "dataset_prepared_path",
    "resume_from_checkpoint",
)
# stand-ins for required keys that failed, so the rules that do not read them still run
PLACEHOLDERS = {"base_model": "placeholder/model", "learning_rate": 1e-4}


def validate_config(raw: Any, env: Mapping[str, str] | None = None) -> Report:
    """Every problem of a training config at once; `report.value` is the TrainingConfig when valid."""
    env = os.environ if env is None else env
    report = Report()
    if not isinstance(raw, Mapping):
        report.error("", f"a training config must be a mapping of keys to values, got {type(raw).__name__}")
        return report
    problem = shape_problem(raw)
    if problem:
        report.error("", f"the training config {problem}; a training config is a mapping of plain values")
        return report
    layers = operator_layers(env, report)
    local = Report()
    normalized = normalize_keys(layers.apply(raw, local), local)
    cfg = classify_dataset_lists(classify_keys(normalized, env, local), env, local)
    check_reward_funcs(cfg, env, local)
    check_paths(cfg, env, local)
    model = typed_model(cfg, set(), local)
    report.errors += [layers.blame(i, raw) for i in local.errors]
    report.warnings += local.warnings
    if model is not None and report.valid:
        report.value = model
    return report.capped()


def typed_model(cfg: dict[str, Any], skipped: set[str], report: Report) -> TrainingConfig | None:
    """The TrainingConfig, or None; cross-field rules run either way, on the keys that hold real values.

    `skipped`: keys left out on purpose (already reported), which the rules must not read either.
    """
    try:
        model = TrainingConfig.model_validate(cfg)
    except ValidationError as e:
        report.errors += pydantic_issues(e)
        broken = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        valid_part = {k: v for k, v in cfg.items() if k not in broken}
        try:
            stand_in = TrainingConfig.model_validate({**PLACEHOLDERS, **valid_part})
        except ValidationError:  # cannot happen while fields are checked one by one; then report what we have
            return None
        report.errors += cross_field_errors(stand_in, broken | skipped | (set(PLACEHOLDERS) - set(valid_part)))
        return None
    report.errors += cross_field_errors(model, skipped)
    report.warnings += unfused_lora_warnings(model)
    return model


def check_paths(cfg: Mapping[str, Any], env: Mapping[str, str], report: Report) -> None:
    """Local paths must resolve under BASE_VOLUME or FTW_ALLOWED_PATHS (schemas.paths), URLs must name
    public hosts (schemas.hosts), and a model or folder key is never a URL."""
    candidates: list[tuple[str, Any]] = [(k, cfg.get(k)) for k in PATH_KEYS]
    for list_key in DATASET_LISTS:
        entries = cfg.get(list_key)
        if not isinstance(entries, list):
            continue
        for i, ds in enumerate(entries):
            if isinstance(ds, Mapping):
                candidates.append((format_loc([list_key, i, "path"]), ds.get("path")))
                files = ds.get("data_files")
                for j, f in enumerate(files if isinstance(files, list) else [files] if files else []):
                    candidates.append((format_loc([list_key, i, "data_files", j]), f))
    for loc, value in candidates:
        if isinstance(value, str):
            if value.lower().startswith(("http://", "https://")):
                problem = (
                    (
                        f"{loc} is a URL, which ftw does not download models or folders from; give a Hub id "
                        "(org/name) or a local folder under BASE_VOLUME"
                    )
                    if loc in PATH_KEYS
                    else check_url(value, env)
                )
            else:
                problem = check_local_path(value, env)
            if problem:
                report.errors.append(Issue(loc, problem, "gated"))

"""GRPO's reward functions: a closed registry of built-ins, and the user's own where the operator allows it.

    reward(completions, answers, lengths, cfg) -> list[float]       a built-in, by name

- exact_match:     1.0 when the completion, stripped, equals the row's answer (stripped), else 0.0
- contains_answer: 1.0 when the answer (stripped) occurs in the completion
- regex_format:    1.0 when the stripped completion fully matches `trl.reward_regex` (default: an
                   answer of digits, signs and spaces, `[-+0-9 .]+`)
- length:          −(completion tokens / trl.max_completion_length): shorter is better, in [−1, 0]
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from schemas.config import TrainingConfig
from schemas.environment import env_flag
from schemas.paths import find_module_file
from worker.errors import JobSpecError, TrainingError

DEFAULT_FORMAT = r"[-+0-9 .]+"


def exact_match(completions: list[str], answers: list[str], lengths: list[int], cfg: TrainingConfig) -> list[float]:
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answers)]


def contains_answer(completions: list[str], answers: list[str], lengths: list[int], cfg: TrainingConfig) -> list[float]:
    return [float(bool(a.strip()) and a.strip() in c) for c, a in zip(completions, answers)]


def regex_format(completions: list[str], answers: list[str], lengths: list[int], cfg: TrainingConfig) -> list[float]:
    pattern = re.compile(getattr(cfg.trl, "reward_regex", None) or DEFAULT_FORMAT)
    return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]


def length(completions: list[str], answers: list[str], lengths: list[int], cfg: TrainingConfig) -> list[float]:
    limit = cfg.trl.max_completion_length if cfg.trl else 256
    return [-n / limit for n in lengths]


REWARDS: dict[str, Callable[[list[str], list[str], list[int], TrainingConfig], list[float]]] = {
    "exact_match": exact_match,
    "contains_answer": contains_answer,
    "regex_format": regex_format,
    "length": length,
}


class UserReward:
    """`module.function` from a file under BASE_VOLUME / FTW_ALLOWED_PATHS, loaded only where the operator set
    FTW_ALLOW_PLUGINS (checked at validation, and again here: a config can reach the train child without it).

    It is called as TRL calls reward functions, with keywords: `fn(prompts=, completions=, completion_ids=,
    answer=)` (one entry per completion; `answer` is the row's), and returns one number per completion
    (None where it does not apply: it then counts as 0 in the weighted sum, as TRL's nansum does)."""

    def __init__(self, name: str, env: Mapping[str, str]):
        module, _, function = name.rpartition(".")
        if not env_flag(env, "FTW_ALLOW_PLUGINS"):
            raise JobSpecError(
                f"trl.reward_funcs: {name!r} is user code, refused unless the operator sets FTW_ALLOW_PLUGINS=1",
                hint="use the built-ins, or ask the endpoint operator to set FTW_ALLOW_PLUGINS=1",
            )
        path = find_module_file(module, env)
        if path is None:
            raise JobSpecError(
                f"trl.reward_funcs: {name!r}: no {module.replace('.', '/')}.py under BASE_VOLUME or FTW_ALLOWED_PATHS",
                hint="put the module's file under BASE_VOLUME (or a folder of FTW_ALLOWED_PATHS)",
            )
        self.name, self.path = name, path
        spec = importlib.util.spec_from_file_location(f"ftw_reward.{module}", path)
        assert spec is not None and spec.loader is not None
        code = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(code)
        except Exception as e:
            raise JobSpecError(
                f"trl.reward_funcs: importing {path} failed ({type(e).__name__}: {e})", hint=f"fix {path}"
            ) from e
        fn = getattr(code, function, None)
        if not callable(fn):
            raise JobSpecError(f"trl.reward_funcs: {path} has no function {function!r}", hint=f"define it in {path}")
        self.fn: Callable[..., Any] = fn

    def __call__(
        self, prompts: list[str], completions: list[str], completion_ids: list[list[int]], answers: list[str]
    ) -> list[float]:
        try:
            values = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answers)
        except Exception as e:
            raise TrainingError(
                f"reward function {self.name} raised {type(e).__name__}: {e}",
                hint=f"fix it in {self.path} (it gets prompts=, completions=, completion_ids=, answer= as lists)",
            ) from e
        ok = isinstance(values, (list, tuple)) and len(values) == len(completions)
        if not ok or not all(v is None or isinstance(v, (int, float)) for v in values):
            raise TrainingError(
                f"reward function {self.name} must return {len(completions)} numbers (or None), one per completion; "
                f"it returned {type(values).__name__} {str(values)[:200]}",
                hint=f"fix it in {self.path}",
            )
        return [math.nan if v is None else float(v) for v in values]


class Rewards:
    """Every configured reward function of a run, built-in or the user's, loaded once."""

    def __init__(self, cfg: TrainingConfig, env: Mapping[str, str]):
        self.cfg = cfg
        self.names = list(cfg.trl.reward_funcs or []) if cfg.trl else []
        self.user = {name: UserReward(name, env) for name in self.names if name not in REWARDS}

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        answers: list[str],
    ) -> dict[str, list[float]]:
        """Each function's values by name (the weighted sum is the caller's)."""
        lengths = [len(c) for c in completion_ids]
        return {
            name: self.user[name](prompts, completions, completion_ids, answers)
            if name in self.user
            else REWARDS[name](completions, answers, lengths, self.cfg)
            for name in self.names
        }

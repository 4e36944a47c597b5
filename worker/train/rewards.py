"""GRPO's reward functions: a closed registry of built-ins (no user code: schemas/rl_rules.py refuses
module paths unless the operator allows plugins, and ftw does not load them).

    reward(name, completions, answers, cfg) -> list[float]

- exact_match:     1.0 when the completion, stripped, equals the row's answer (stripped), else 0.0
- contains_answer: 1.0 when the answer (stripped) occurs in the completion
- regex_format:    1.0 when the stripped completion fully matches `trl.reward_regex` (default: an
                   answer of digits, signs and spaces, `[-+0-9 .]+`)
- length:          −(completion tokens / trl.max_completion_length): shorter is better, in [−1, 0]
"""

from __future__ import annotations

import re
from collections.abc import Callable

from schemas.config import TrainingConfig

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


def rewards(
    cfg: TrainingConfig, completions: list[str], answers: list[str], lengths: list[int]
) -> dict[str, list[float]]:
    """Every configured reward function's values, by name (the weighted sum is the caller's)."""
    return {name: REWARDS[name](completions, answers, lengths, cfg) for name in cfg.trl.reward_funcs}

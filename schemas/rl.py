"""Preference and RL training keys (`rl:` and its options), typed, with the dataset types each method reads.

    rl: dpo | ipo | orpo | kto | simpo      preference pairs (kto: single completions with a label)
    rl: grpo                                 prompts + verifiable answers, rewards from built-ins

Key names and defaults are axolotl's (which passes them to TRL): beta is `trl.beta`, else `rl_beta`,
else `orpo_alpha` (TRL's ORPO calls λ beta), else 0.1. The dataset types are axolotl's
(`chatml.intel`, `llama3.argilla`, `chat_template.default`, the dict form...): the family before
the dot names the chat template (chatml, llama3, or the config's own for chat_template) and the
part after it names where prompt, chosen and rejected live in a row (worker/data/preference.py).
"""

# No `from __future__ import annotations` here: pydantic builds models from real types faster than from strings.
from typing import Literal

from pydantic import ConfigDict, Field

from schemas.base import Frozen

PAIR_METHODS = ("dpo", "ipo", "orpo", "simpo")
RL_METHODS = (*PAIR_METHODS, "kto", "grpo")
NEEDS_REFERENCE = ("dpo", "ipo", "kto", "grpo")  # orpo and simpo have no reference model
NOT_BUILT = {"gdpo": "GDPO (multi-objective GRPO)", "ebft": "energy-based fine-tuning (EBFT)"}
DPO_LOSS_TYPES = ("sigmoid", "ipo")

# where prompt / chosen / rejected (or completion) live in a row, by the name after the family's dot
PAIR_LAYOUTS = ("argilla", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra", "default")
KTO_LAYOUTS = ("argilla", "argilla_chat", "intel", "prompt_pairs", "ultra", "default")
TEMPLATE_FAMILIES = ("chatml", "llama3")
# `chatml` alone is axolotl's spelling of chatml.default
PAIR_TYPES = (
    *TEMPLATE_FAMILIES,
    *(f"{f}.{k}" for f in TEMPLATE_FAMILIES for k in PAIR_LAYOUTS),
    "chat_template.default",
    "chat_template.argilla_chat",
)
KTO_TYPES = (*TEMPLATE_FAMILIES, *(f"{f}.{k}" for f in TEMPLATE_FAMILIES for k in KTO_LAYOUTS))
GRPO_TYPES = ("prompt_answer", "chat_template.prompt_answer")

# built-in GRPO rewards (worker/train/rewards.py); anything else would be user code
BUILTIN_REWARDS = ("exact_match", "contains_answer", "regex_format", "length")


def dataset_types(rl: str) -> tuple[str, ...]:
    if rl == "kto":
        return KTO_TYPES
    if rl == "grpo":
        return GRPO_TYPES
    return PAIR_TYPES


class TrlConfig(Frozen):
    """axolotl's `trl:` block (GRPO options). Keys it has that ftw does not build are named by schemas.rl_rules."""

    model_config = ConfigDict(extra="allow")
    beta: float | None = Field(default=None, ge=0.0)
    num_generations: int = Field(default=8, ge=2, le=256)
    max_completion_length: int = Field(default=256, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    reward_funcs: list[str] | None = None
    reward_weights: list[float] | None = None
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "bnpo"
    epsilon: float = Field(default=0.2, gt=0.0, lt=1.0)
    epsilon_high: float | None = Field(default=None, gt=0.0, lt=10.0)
    scale_rewards: bool = True
    num_iterations: int = Field(default=1, ge=1)
    mask_truncated_completions: bool = False
    use_vllm: bool = False
    reward_regex: str | None = None  # ftw's own: the pattern of the regex_format reward (default: digits)
    log_completions: bool | None = None
    num_completions_to_print: int | None = Field(default=None, ge=0)


# trl keys of axolotl's schema that ftw does not build: named as unsupported, never ignored
TRL_NOT_BUILT = {
    **dict.fromkeys(
        "vllm_mode vllm_server_host vllm_server_port vllm_server_timeout vllm_guided_decoding_regex "
        "vllm_enable_sleep_mode vllm_sync_interval vllm_lora_sync vllm_importance_sampling_correction "
        "vllm_importance_sampling_mode vllm_importance_sampling_cap".split(),
        "vLLM generation",
    ),
    **dict.fromkeys(
        "async_prefetch use_data_producer prefetch_depth streaming_partial_batch streaming_min_groups "
        "replay_buffer_size replay_recompute_logps reroll_start_fraction reroll_max_groups "
        "skip_zero_advantage_batches off_policy_mask_threshold reward_num_workers".split(),
        "asynchronous GRPO",
    ),
    **dict.fromkeys("sync_ref_model ref_model_mixup_alpha ref_model_sync_steps".split(), "reference-model syncing"),
    **dict.fromkeys("rollout_func multi_objective_aggregation".split(), "custom rollouts and GDPO aggregation"),
    **dict.fromkeys(
        "importance_sampling_level use_bias_correction_kl use_liger_loss generation_batch_size "
        "generation_kwargs chat_template_kwargs".split(),
        "this GRPO option",
    ),
}

"""Preference and RL training keys (`rl:` and its options), typed, with the dataset types each method reads.

    rl: dpo | ipo | orpo | kto | simpo      preference pairs (kto: single completions with a label)
    rl: grpo                                 prompts + verifiable answers, rewards from built-ins
    rl: ebft                                 ground-truth continuations, rewards from feature matching (`ebft:`)

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
RL_METHODS = (*PAIR_METHODS, "kto", "grpo", "ebft")
NEEDS_REFERENCE = ("dpo", "ipo", "kto", "grpo")  # orpo and simpo have no reference model
NOT_BUILT = {"gdpo": "GDPO (multi-objective GRPO)"}
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
# EBFT's transforms (axolotl's names): structured rows are a chat prompt + its ground truth; strided
# rows are one document (raw prompt + completion, a chat conversation, or plain text)
EBFT_STRUCTURED_TYPES = ("ebft_opencode.transform",)
EBFT_STRIDED_TYPES = ("ebft_strided_structured.transform", "ebft_strided_chat.transform", "ebft_pretrain.transform")

# built-in GRPO rewards (worker/train/rewards.py); anything else would be user code
BUILTIN_REWARDS = ("exact_match", "contains_answer", "regex_format", "length")


def dataset_types(rl: str) -> tuple[str, ...]:
    if rl == "kto":
        return KTO_TYPES
    if rl == "grpo":
        return GRPO_TYPES
    if rl == "ebft":
        return (*EBFT_STRUCTURED_TYPES, *EBFT_STRIDED_TYPES)
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
    vllm_mode: Literal["server", "colocate"] | None = None  # ftw runs its own engine: colocate only (schemas.rl_rules)
    vllm_sync_interval: int = Field(default=1, ge=1)  # optimizer steps between adapter syncs to the engine
    vllm_lora_sync: bool | None = None  # ftw always syncs LoRA by loading the adapter (the only way it has)
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0.0, lt=1.0)  # the engine's share of the GPU
    reward_regex: str | None = None  # ftw's own: the pattern of the regex_format reward (default: digits)
    log_completions: bool | None = None
    num_completions_to_print: int | None = Field(default=None, ge=0)


# trl keys of axolotl's schema that ftw does not build: named as unsupported, never ignored
TRL_NOT_BUILT = {
    **dict.fromkeys(
        "vllm_server_host vllm_server_port vllm_server_timeout".split(),
        "an external vLLM server: ftw starts its own engine on the training GPU",
    ),
    **dict.fromkeys(
        "vllm_guided_decoding_regex vllm_enable_sleep_mode vllm_importance_sampling_correction "
        "vllm_importance_sampling_mode vllm_importance_sampling_cap".split(),
        "this vLLM generation option",
    ),
    **dict.fromkeys(
        "async_prefetch use_data_producer prefetch_depth streaming_partial_batch streaming_min_groups "
        "replay_buffer_size replay_recompute_logps reroll_start_fraction reroll_max_groups "
        "skip_zero_advantage_batches off_policy_mask_threshold reward_num_workers".split(),
        "asynchronous generation: GRPO's and EBFT structured mode's async mode; ftw generates in sync",
    ),
    **dict.fromkeys("sync_ref_model ref_model_mixup_alpha ref_model_sync_steps".split(), "reference-model syncing"),
    **dict.fromkeys("rollout_func multi_objective_aggregation".split(), "custom rollouts and GDPO aggregation"),
    **dict.fromkeys(
        "importance_sampling_level use_bias_correction_kl use_liger_loss generation_batch_size "
        "generation_kwargs chat_template_kwargs".split(),
        "this GRPO option",
    ),
}


class EbftConfig(Frozen):
    """axolotl's `ebft:` block (energy-based fine-tuning; worker/train/ebft*.py).

    Structured mode generates `trl.num_generations` completions per prompt (GRPO's generation and
    policy loss); strided mode generates `n_samples_per_prompt` rollouts of `generate_max_len`
    tokens at anchors every `stride` tokens of a document, all in one forward. Each block of a
    document conditions on the whole document before its anchor; the first anchor is at least
    `context_length` tokens in (and `min_completion_prefix` past the prompt, for documents that
    have one), as axolotl's trainer places them.
    """

    model_config = ConfigDict(extra="allow")
    mode: Literal["structured", "strided"] = "structured"
    feature_layers: list[float] = Field(default=[0.25, 0.5, 0.75], min_length=1, max_length=64)
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = "last_token"
    use_whitening: bool = False
    alignment_coef: float = Field(default=1.0, ge=0.0)
    diversity_coef: float | None = Field(default=None, ge=0.0)  # None: 1.0, or 0.0 with one sample
    ce_coef: float = Field(default=0.0, ge=0.0)
    rl_coef: float = Field(default=1.0, ge=0.0)
    # structured mode (generation through trl:)
    adaptive_max_tokens: bool = True
    gt_length_multiplier: float = Field(default=1.5, ge=0.1)
    # strided mode
    stride: int = Field(default=8, ge=1)
    context_length: int = Field(default=8, ge=1)
    generate_max_len: int = Field(default=8, ge=1, le=1024)
    n_samples_per_prompt: int = Field(default=4, ge=1, le=256)
    temperature: float = Field(default=0.6, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # None: rloo, or reinforce with one sample
    advantage_estimator: Literal["rloo", "group_norm", "reinforce"] | None = None
    min_completion_prefix: int = Field(default=0, ge=0)

    def samples(self, trl: TrlConfig | None) -> int:
        """Rollouts per prompt or document: trl.num_generations (structured) or n_samples_per_prompt (strided)."""
        return self.n_samples_per_prompt if self.mode == "strided" else (trl or TrlConfig()).num_generations

    def estimator(self, trl: TrlConfig | None) -> str:
        """axolotl's default: rloo, and reinforce with one sample (a leave-one-out baseline needs two)."""
        if self.advantage_estimator is not None:
            return self.advantage_estimator
        return "reinforce" if self.samples(trl) == 1 else "rloo"

    def diversity(self, trl: TrlConfig | None) -> float:
        """axolotl's default: 1.0, and 0.0 with one sample (the diversity term compares samples)."""
        if self.diversity_coef is not None:
            return self.diversity_coef
        return 0.0 if self.samples(trl) == 1 else 1.0


# keys of one mode only: set in the other they would do nothing
EBFT_STRIDED_KEYS = (
    "stride context_length generate_max_len n_samples_per_prompt temperature top_p advantage_estimator "
    "min_completion_prefix rl_coef"
).split()
EBFT_STRUCTURED_KEYS = ("adaptive_max_tokens", "gt_length_multiplier")

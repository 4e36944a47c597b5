"""What an RL method asks of its completions, in one shape both generation backends read
(worker/train/generation.py: transformers `generate`; worker/train/vllm_generation.py: vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from schemas.rl import TrlConfig


@dataclass(frozen=True)
class Sampling:
    """How to sample: the keys of `trl:` (GRPO) or `ebft:` (EBFT), in one shape both backends read."""

    n: int  # completions per prompt
    max_tokens: int
    temperature: float
    stop_id: int  # the end-of-sequence token: generation stops after it
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_trl(cls, trl: TrlConfig, stop_id: int) -> Sampling:
        return cls(
            n=trl.num_generations,
            max_tokens=trl.max_completion_length,
            temperature=trl.temperature,
            stop_id=stop_id,
            top_p=trl.top_p,
            top_k=trl.top_k,
            min_p=trl.min_p,
            repetition_penalty=trl.repetition_penalty,
        )


@dataclass(frozen=True)
class VllmOptions:
    """What the vLLM backend needs beyond the training config, from `trl:` (GRPO's and EBFT structured mode's:
    their completion length sizes the engine's context)."""

    sync_interval: int  # optimizer steps between adapter syncs
    gpu_memory_utilization: float  # the engine's share of the GPU
    max_tokens: int  # the longest completion asked for: the engine's context is sequence_len + this

    @classmethod
    def from_trl(cls, trl: TrlConfig) -> VllmOptions:
        return cls(trl.vllm_sync_interval, trl.vllm_gpu_memory_utilization, trl.max_completion_length)


class Generator(Protocol):
    name: str

    def sync(self, step: int, force: bool = False) -> None:
        """Make the next completions come from the policy as of `step` optimizer steps (when due, or `force`)."""

    def completions(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """`sampling.n` completions per prompt, prompt-major, each cut after its first `sampling.stop_id`."""

    def close(self) -> None: ...


def cut_at_stop(tokens: list[int], stop_id: int) -> list[int]:
    return tokens[: tokens.index(stop_id) + 1] if stop_id in tokens else tokens

"""Where an RL method's completions come from: one function call, two backends.

    generator = build_generator(model, tokenizer, vllm_options, cfg, run_dir)   # vllm_options: None = transformers
    generator.sync(step)                                   # the engine follows the policy (vLLM; no-op here)
    completions = generator.completions(prompts, sampling)  # token ids, `sampling.n` per prompt, prompt-major

- `TransformersGenerator`: the policy's own `generate` (adapter on, eval mode, no grad), in this process.
- `VllmGenerator` (worker/train/vllm_generation.py): vLLM as a child process, the serving worker's engine,
  the LoRA adapter saved and loaded into it every `vllm_sync_interval` optimizer steps.

A completion is cut after the first `stop_id` (kept: it is a token the policy chose); one that never
reached it is as long as `max_tokens`. GRPO and EBFT's structured mode build their rollouts from these
lists, so they never see which backend produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from schemas.config import TrainingConfig
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
    """What the vLLM backend needs beyond the training config: GRPO takes these from `trl:`; EBFT's structured
    mode passes its own (its completion length, the same axolotl/TRL key names for the engine)."""

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


class TransformersGenerator:
    """The policy's own `generate` on left-padded prompts (what the trainer's device holds)."""

    name = "transformers"

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model, self.pad_id = model, pad_id

    def sync(self, step: int, force: bool = False) -> None:
        """Nothing to do: generation uses the live weights."""

    @torch.no_grad()
    def completions(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(  # type: ignore[operator]
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or 0,
                min_p=sampling.min_p,
                repetition_penalty=sampling.repetition_penalty,
                max_new_tokens=sampling.max_tokens,
                num_return_sequences=sampling.n,
                eos_token_id=sampling.stop_id,
                pad_token_id=self.pad_id,
            )
        finally:
            self.model.train(was_training)
        return [cut_at_stop(row, sampling.stop_id) for row in out[:, width:].tolist()]

    def close(self) -> None:
        """Nothing to stop."""


def build_generator(
    model: torch.nn.Module,
    tokenizer: Any,
    vllm: VllmOptions | None = None,
    cfg: TrainingConfig | None = None,
    run_dir: Path | None = None,
) -> Generator:
    """transformers' `generate`, or vLLM with `vllm` options (the engine starts here, answering before this
    returns; it needs the training config and the run folder)."""
    if vllm is None:
        return TransformersGenerator(model, tokenizer.pad_token_id or 0)
    from worker.train.vllm_generation import VllmGenerator

    assert cfg is not None, "vLLM generation needs the training config"
    return VllmGenerator(cfg, model, run_dir, vllm)

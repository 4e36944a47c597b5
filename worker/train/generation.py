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

from pathlib import Path
from typing import Any

import torch

from schemas.config import TrainingConfig
from worker.train.sampling import Generator, Sampling, VllmOptions, cut_at_stop


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

"""Instruction strategies: `alpaca` (+ `:chat`, `:chatml`, `:phi` prompt styles) and the dict form.

The prompt (system + instruction/input turn) is tokenised on its own, with the tokenizer's leading
special tokens; the response is tokenised without them and gets EOS appended. So the boundary
between masked prompt and trained response is exact by construction: no merge across it.
Prompt tokens are -100 unless train_on_inputs; the response's EOS is always trained (as axolotl's
instruction strategies do: train_on_eos belongs to chat_template and is not read here).
Formats are axolotl's (prompters.AlpacaPrompter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schemas.datasets import UserDefinedFormat
from worker.data.strategies.base import IGNORE, Context, Sample
from worker.errors import JobSpecError

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class PromptFormat:
    turn: str  # uses {instruction} and {input}
    turn_no_input: str  # uses {instruction}
    system_format: str  # uses {system}
    system_prompt: str = ALPACA_SYSTEM
    system_no_input_prompt: str = ALPACA_SYSTEM_NO_INPUT


ALPACA_STYLES = {
    "instruct": PromptFormat(
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
        "{system}\n\n",
    ),
    "chat": PromptFormat(
        "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:", "SYSTEM: {system}\n"
    ),
    "chatml": PromptFormat(
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\n{system}<|im_end|>\n",
    ),
    "phi": PromptFormat(
        "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
        "<|system|>\n{system}<|end|>\n",
    ),
}


class InstructStrategy:
    def __init__(self, ctx: Context, fmt: PromptFormat, fields: dict[str, str | None], system_from_row: bool = False):
        self.ctx = ctx
        self.fmt = fmt
        self.fields = fields  # role -> column: instruction, input, output, system
        self.system_from_row = system_from_row
        self.columns = tuple(c for k, c in fields.items() if c and k in ("instruction", "output"))
        self.eos = ctx.eos_id()
        self.lead = ctx.lead_ids()

    def prompt(self, row: dict[str, Any], index: int) -> str:
        f = self.fields
        instruction = self.ctx.require_str(row.get(f["instruction"]), index, f["instruction"])
        text_input = row.get(f["input"]) if f["input"] else None
        if text_input is not None and not isinstance(text_input, str):
            raise self.ctx.row_error(index, f["input"], f"expected text, got {type(text_input).__name__}")
        system = self.fmt.system_prompt if text_input else self.fmt.system_no_input_prompt
        if self.system_from_row and f["system"] and row.get(f["system"]):
            system = self.ctx.require_str(row.get(f["system"]), index, f["system"])
        head = self.fmt.system_format.format(system=system) if system else ""
        if text_input:
            return head + self.fmt.turn.format(instruction=instruction, input=text_input)
        return head + self.fmt.turn_no_input.format(instruction=instruction)

    def tokenize(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[list[Sample]]:
        prompts = [self.prompt(row, i) for row, i in zip(rows, indices)]
        responses = [
            self.ctx.require_str(row.get(self.fields["output"]), i, self.fields["output"])
            for row, i in zip(rows, indices)
        ]
        tok = self.ctx.tokenizer
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tok(responses, add_special_tokens=False)["input_ids"]
        out = []
        for p, r in zip(prompt_ids, response_ids):
            p = self.lead + list(p)
            r = list(r) + [self.eos]
            prompt_labels = list(p) if self.ctx.train_on_inputs else [IGNORE] * len(p)
            labels = prompt_labels + r
            out.append([Sample(p + r, labels)])
        return out


def alpaca(ctx: Context, style: str) -> InstructStrategy:
    if style not in ALPACA_STYLES:
        raise JobSpecError(
            f"unknown alpaca style {style!r}", hint=f"use one of: {', '.join('alpaca:' + s for s in ALPACA_STYLES)}"
        )
    return InstructStrategy(
        ctx, ALPACA_STYLES[style], {"instruction": "instruction", "input": "input", "output": "output", "system": None}
    )


def user_defined(ctx: Context, spec: UserDefinedFormat) -> InstructStrategy:
    """The dict form of `type`: {field_*, format, no_input_format, system_format, system_prompt}."""
    if not spec.format:
        raise JobSpecError('the dict form of `type` needs `format` (e.g. "[INST] {instruction} {input} [/INST]")')
    fmt = PromptFormat(
        turn=spec.format,
        turn_no_input=spec.no_input_format or spec.format.replace("{input}", ""),
        system_format=spec.system_format or "{system}",
        system_prompt=spec.system_prompt or "",
        system_no_input_prompt=spec.system_prompt or "",
    )
    fields = {
        "instruction": spec.field_instruction or "instruction",
        "input": spec.field_input or "input",
        "output": spec.field_output or "output",
        "system": spec.field_system or "system",
    }
    return InstructStrategy(ctx, fmt, fields, system_from_row=True)

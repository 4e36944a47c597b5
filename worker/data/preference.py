"""Preference and RL rows → tokens, through the same chat-template code as supervised fine-tuning.

    strategy = build_rl_strategy(ctx)            # ctx.config.rl picks pairs, kto or grpo
    strategy.tokenize_rows(rows, indices) -> list[RlSample]

A type is `<family>.<layout>` (schemas/rl.py): the family names the chat template (`chatml`,
`llama3`, or `chat_template` for the config's own), the layout names where a row keeps the prompt,
the chosen and rejected answers (kto: one completion and its `label`; grpo: a prompt and its
`answer`). The conversation prompt + [assistant: answer] is tokenised by ChatTemplateStrategy, with
only the final assistant message (and its end-of-turn token, per train_on_eos) trained: the
masking is exactly the SFT path's, so a DPO pair's tokens are the tokens SFT would train on.
The dict form of `type` (axolotl's user_defined.default) is raw text: the formatted prompt
(masked) then the formatted answer + EOS (trained), as the instruction strategies do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schemas.datasets import UserDefinedFormat
from schemas.rl import PAIR_METHODS, TEMPLATE_FAMILIES
from worker.data.strategies.base import IGNORE, Context, Sample
from worker.data.strategies.chat import ChatTemplateStrategy
from worker.data.strategies.templates import template_for

PROMPT_KEYS = ("prompt", "input", "question", "instruction")  # chatml.default: the first one present
LAYOUT_PROMPT = {
    "argilla": "instruction",
    "icr": "input",
    "intel": "question",
    "prompt_pairs": "prompt",
    "ultra": "prompt",
    "prompt_answer": "prompt",
}
TRAINING_FLAG = "training"


@dataclass(frozen=True)
class RlSample:
    """One row's tokens: `chosen` (or kto's completion, or grpo's prompt), `rejected` for pairs;
    `desirable` for kto; `answer` (text) for grpo."""

    chosen: Sample
    rejected: Sample | None = None
    desirable: bool = True
    answer: str = ""


def split_type(kind: str) -> tuple[str, str]:
    """'chatml.intel' → ('chatml', 'intel'); 'chatml' → ('chatml', 'default');
    'prompt_answer' → ('chat_template', 'prompt_answer')."""
    family, _, layout = kind.partition(".")
    if not layout:
        return (family, "default") if family in TEMPLATE_FAMILIES else ("chat_template", family)
    return family, layout


class ChatRows:
    """Row layouts read through a chat template: messages out of a row, then tokens by ChatTemplateStrategy."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        family, self.layout = split_type(ctx.dataset.type)
        ds = ctx.dataset
        if family in TEMPLATE_FAMILIES:  # rows in plain role/content form, the family's template
            ds = ds.model_copy(
                update={
                    "chat_template": family,
                    "chat_template_jinja": None,
                    "message_property_mappings": None,
                    "message_field_role": None,
                    "message_field_content": None,
                    "roles": None,
                }
            )
        self.messages_field = (
            ds.field_messages if self.layout == "default" and family == "chat_template" else "messages"
        )
        ds = ds.model_copy(
            update={
                "field_messages": self.messages_field,
                "message_field_training": TRAINING_FLAG,
                "type": "chat_template",
            }
        )
        self.chat = ChatTemplateStrategy(Context(ds, ctx.config, ctx.tokenizer, ctx.source))
        self.role_key, self.content_key = ds.role_key(), ds.content_key()
        self.template = template_for(ds, ctx.config, ctx.tokenizer)

    # ---- where the parts of a row are ------------------------------------------------------------
    def text(self, row: dict[str, Any], index: int, key: str) -> str:
        return self.ctx.require_str(row.get(key), index, key)

    def turn(self, row: dict[str, Any], index: int, key: str, at: int) -> str:
        """Content of message `at` of a conversation column (argilla_chat, ultra)."""
        conv = row.get(key)
        if not isinstance(conv, list) or len(conv) <= at or not isinstance(conv[at], dict):
            raise self.ctx.row_error(index, key, f"expected a conversation with a message at position {at}")
        return self.ctx.require_str(conv[at].get("content"), index, f"{key}[{at}].content")

    def message(self, role: str, content: str) -> dict[str, Any]:
        return {self.role_key: role, self.content_key: content}

    def prompt(self, row: dict[str, Any], index: int) -> list[dict[str, Any]]:
        ds = self.ctx.dataset
        if (
            self.layout == "default" and self.messages_field != "messages"
        ):  # chat_template.default: the row's own conversation
            conv = row.get(self.messages_field)
            if not isinstance(conv, list):
                raise self.ctx.row_error(index, self.messages_field, "expected a list of messages (the prompt)")
            return [dict(m) if isinstance(m, dict) else m for m in conv]
        if self.layout == "argilla_chat":
            first = ds.field_chosen or "chosen" if self.ctx.config.rl != "kto" else ds.field_completion or "completion"
            return [self.message("user", self.turn(row, index, first, 0))]
        key = (
            ds.field_prompt
            or LAYOUT_PROMPT.get(self.layout)
            or next((k for k in PROMPT_KEYS if row.get(k) is not None), "prompt")
        )
        out = [self.message("user", self.text(row, index, key))]
        system = row.get("system")
        if isinstance(system, str) and system:
            out.insert(0, self.message("system", system))
        return out

    def answer(self, row: dict[str, Any], index: int, side: str) -> dict[str, Any]:
        """The chosen / rejected (/ completion) message of a row."""
        ds = self.ctx.dataset
        key = {"chosen": ds.field_chosen, "rejected": ds.field_rejected, "completion": ds.field_completion}[
            side
        ] or side
        if self.layout == "default" and self.messages_field != "messages":
            value = row.get(key)
            if isinstance(value, dict):
                return dict(value)
            return self.message("assistant", self.text(row, index, key))
        if self.layout in ("argilla_chat", "ultra"):
            return self.message("assistant", self.turn(row, index, key, 1))
        if self.layout == "argilla" and side != "completion":
            key = ds.field_chosen or "chosen_response" if side == "chosen" else ds.field_rejected or "rejected_response"
        elif self.layout == "default" and row.get(key) is None and row.get(f"{side}_response") is not None:
            key = f"{side}_response"
        return self.message("assistant", self.text(row, index, key))

    # ---- tokens ------------------------------------------------------------------------------
    def conversations(self, prompt: list[dict[str, Any]], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        untrained = [{**m, TRAINING_FLAG: False} for m in prompt]
        return [{self.messages_field: [*untrained, {**a, TRAINING_FLAG: True}]} for a in answers]

    def tokenize_rows(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[RlSample]:
        rl = self.ctx.config.rl
        if rl == "grpo":
            return [self.grpo(row, i) for row, i in zip(rows, indices)]
        out = []
        for row, i in zip(rows, indices):
            prompt = self.prompt(row, i)
            sides = ("chosen", "rejected") if rl in PAIR_METHODS else ("completion",)
            convs = self.conversations(prompt, [self.answer(row, i, s) for s in sides])
            samples = [s for per_row in self.chat.tokenize(convs, [i] * len(convs)) for s in per_row]
            if rl in PAIR_METHODS:
                out.append(RlSample(samples[0], samples[1]))
            else:
                out.append(RlSample(samples[0], desirable=self.label(row, i)))
        return out

    def label(self, row: dict[str, Any], index: int) -> bool:
        key = self.ctx.dataset.field_label or "label"
        value = row.get(key)
        if not isinstance(value, bool):
            raise self.ctx.row_error(index, key, f"expected true (desirable) or false (undesirable), got {value!r}")
        return value

    def grpo(self, row: dict[str, Any], index: int) -> RlSample:
        """The prompt rendered as the model will see it at generation (with the assistant header)."""
        ds = self.ctx.dataset
        raw = row.get(ds.field_prompt or "prompt")
        if isinstance(raw, list):
            messages, _ = self.chat.conversation({self.messages_field: raw}, index)
        else:
            messages = self.prompt(row, index)
        answer_key = ds.field_answer or "answer"
        answer = row.get(answer_key)
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise self.ctx.row_error(
                index, answer_key, f"expected the reference answer as text or a number, got {type(answer).__name__}"
            )
        text = self.ctx.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        ids = list(self.ctx.tokenizer(text, add_special_tokens=False)["input_ids"])
        return RlSample(Sample(ids, [IGNORE] * len(ids)), answer=str(answer))


class RawPairRows:
    """The dict form (user_defined.default): prompt_format / chosen_format / rejected_format over row fields, no
    template."""

    def __init__(self, ctx: Context, spec: UserDefinedFormat):
        self.ctx, self.spec = ctx, spec
        self.lead, self.eos = ctx.lead_ids(), ctx.eos_id()

    def tokenize_rows(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[RlSample]:
        s, tok = self.spec, self.ctx.tokenizer
        out = []
        for row, i in zip(rows, indices):
            field = {k: getattr(s, f"field_{k}") or k for k in ("prompt", "system", "chosen", "rejected")}
            prompt = (s.prompt_format or "{prompt}").format(
                prompt=self.ctx.require_str(row.get(field["prompt"]), i, field["prompt"]),
                system=row.get(field["system"]) or "",
            )
            p = self.lead + list(tok(prompt, add_special_tokens=False)["input_ids"])
            sides = []
            for side in ("chosen", "rejected"):
                text = (getattr(s, f"{side}_format") or f"{{{side}}}").format(
                    **{side: self.ctx.require_str(row.get(field[side]), i, field[side])}
                )
                a = list(tok(text, add_special_tokens=False)["input_ids"]) + [self.eos]
                sides.append(Sample(p + a, [IGNORE] * len(p) + a))
            out.append(RlSample(*sides))
        return out


def build_rl_strategy(ctx: Context) -> ChatRows | RawPairRows:
    if isinstance(ctx.dataset.type, UserDefinedFormat):
        return RawPairRows(ctx, ctx.dataset.type)
    return ChatRows(ctx)

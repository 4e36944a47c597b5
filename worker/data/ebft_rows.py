"""EBFT's dataset types (axolotl's transform names) → one document per row: prompt tokens masked, the rest trained.

    ebft_opencode.transform            {input, output} → chat prompt (user: input) + ground truth (assistant: output)
    ebft_strided_structured.transform  {input, output} → raw prompt text (+ BOS) then raw completion text
    ebft_strided_chat.transform        {messages}      → the conversation (chat template), assistant turns trained
    ebft_pretrain.transform            {text}          → raw text (+ BOS), every token trained (no prompt)

The trained span is what EBFT matches features against: structured mode generates after the prompt
and compares with the ground truth; strided mode places its anchors after the prompt (axolotl's
`prompt_length` is where the labels start) and its CE term runs on the trained tokens. Chat rows go
through ChatTemplateStrategy, so their masking is exactly the SFT path's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.data.preference import ChatRows, RlSample
from worker.data.strategies.base import IGNORE, Context, Sample

PROMPT_FIELDS = ("input", "prompt", "question")  # the first present, unless field_prompt names one
COMPLETION_FIELDS = ("output", "completion", "answer")
TEXT_FIELDS = ("text", "question")
CHAT_FIELDS = ("messages", "conversations")


class EbftRows:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.kind = str(ctx.dataset.type).removesuffix(".transform")
        self.chat = ChatRows(ctx) if self.kind in ("ebft_opencode", "ebft_strided_chat") else None
        self.lead = ctx.lead_ids()

    def field(self, row: dict[str, Any], index: int, named: str | None, candidates: tuple[str, ...]) -> str:
        key = named or next((k for k in candidates if row.get(k) is not None), candidates[0])
        return self.ctx.require_str(row.get(key), index, key)

    def prompt_and_completion(self, row: dict[str, Any], index: int) -> tuple[str, str]:
        ds = self.ctx.dataset
        return (
            self.field(row, index, ds.field_prompt, PROMPT_FIELDS),
            self.field(row, index, ds.field_completion, COMPLETION_FIELDS),
        )

    def text_ids(self, text: str) -> list[int]:
        return list(self.ctx.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_rows(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[RlSample]:
        if self.chat is not None:
            return self.chat_rows(rows, indices)
        out = []
        for row, i in zip(rows, indices):
            if self.kind == "ebft_pretrain":
                ids = self.lead + self.text_ids(self.field(row, i, self.ctx.dataset.field_prompt, TEXT_FIELDS))
                out.append(RlSample(Sample(ids, list(ids))))
                continue
            prompt, completion = self.prompt_and_completion(row, i)
            head, tail = self.lead + self.text_ids(prompt), self.text_ids(completion)
            out.append(RlSample(Sample(head + tail, [IGNORE] * len(head) + tail)))
        return out

    def chat_rows(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[RlSample]:
        chat = self.chat
        assert chat is not None
        convs = []
        for row, i in zip(rows, indices):
            if self.kind == "ebft_opencode":
                prompt, completion = self.prompt_and_completion(row, i)
                convs += chat.conversations([chat.message("user", prompt)], [chat.message("assistant", completion)])
                continue
            key = next((k for k in CHAT_FIELDS if row.get(k) is not None), CHAT_FIELDS[0])
            messages = row.get(key)
            if not isinstance(messages, list) or not messages:
                raise self.ctx.row_error(i, key, "expected a conversation: a list of messages")
            # every assistant turn trained, the rest masked (axolotl's ebft_strided_chat)
            role, content = chat.role_key, chat.content_key
            convs.append(
                {
                    chat.messages_field: [
                        {**m, "training": isinstance(m, dict) and m.get(role) == "assistant"} for m in messages
                    ]
                }
            )
            if not any(isinstance(m, dict) and isinstance(m.get(content), str) for m in messages):
                raise self.ctx.row_error(i, key, "expected messages with text content")
        samples = chat.chat.tokenize(convs, list(indices))
        return [RlSample(s[0] if s else Sample([], [])) for s in samples]  # an empty row: dropped by the length policy

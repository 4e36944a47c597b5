"""`chat_template`: conversations rendered with a chat template, masked message by message.

Where each message's content lies is found in the text the template renders, then mapped to
tokens through the tokenizer's character offsets (one tokenisation of the whole conversation):
1. Render once with every content replaced by its own sentinel character. Putting the contents
   back (verbatim, or trimmed as `| trim` templates do) must give exactly the real render; then
   every content span is known. Two renders per row.
2. Otherwise (a template that rewrites turns, e.g. drops the reasoning of earlier turns), message
   by message: render with that one content replaced by a sentinel; the part where the two
   renders differ is where the template put the message, and it must be (part of) its text.
A span that is not the message's text, a trained message the template does not render, or a span
edge inside a token that also holds template text (other than whitespace) is a DataError naming
the row and message: never a silent mis-mask.

An assistant message with `tool_calls` is trained over everything the template renders for it
(its content and the tool calls, e.g. Qwen3's `<tool_call>{...}</tool_call>` blocks): that span is
where the full render differs from one with the message's content replaced by a sentinel and its
tool calls removed, as axolotl finds it. `tools` in the row go to the template; tool call
arguments and tool parameters given as JSON strings are decoded first, and nulls inside them (left
by the datasets library's schema merge across rows) are dropped, as axolotl does (chat_tools.py).

A message is trained when its own training flag says so (the key named by message_field_training;
unset, as in axolotl, means no flag is read), else when train_on_inputs, else when its role is in
roles_to_train (default assistant).
After each message, the first end-of-turn token (eot_tokens, default [eos_token]) before the next
message is trained per train_on_eot: all (after every message), turn (after trained messages),
last (only the one after the last trained message), none; EOS likewise per train_on_eos (default turn).
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any

from worker.data.strategies.base import IGNORE, Context, Sample
from worker.data.strategies.chat_tools import tool_calls, tool_definitions, without_nulls
from worker.data.strategies.templates import template_for
from worker.errors import JobSpecError

DEFAULT_ROLES = {
    "human": "user",
    "user": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
    "tool": "tool",
}
CARRIED_KEYS = ("name", "tool_calls", "tool_call_id", "reasoning_content")
SENTINEL_BASE = 0xF0000  # Unicode plane 15, private use
PRIVATE_USE = re.compile("[\U000f0000-\U000ffffd]")


class ChatTemplateStrategy:
    def __init__(self, ctx: Context):
        ds, tok = ctx.dataset, ctx.tokenizer
        if not getattr(tok, "is_fast", False):
            raise JobSpecError(
                "type: chat_template needs a fast tokenizer (character offsets)", hint="set tokenizer_use_fast: true"
            )
        self.ctx = ctx
        self.template = template_for(ds, ctx.config, tok)
        self.field_messages = ds.field_messages
        self.columns = (ds.field_messages,)
        self.role_key, self.content_key = ds.role_key(), ds.content_key()
        mappings = ds.message_property_mappings
        self.extra_keys = dict(mappings.model_extra or {}) if mappings is not None else {}
        self.training_key = ds.message_field_training
        if ds.roles:
            # the standard roles stay known beside the mapped ones (axolotl passes any unmapped role through)
            standard = {r: r for r in ("system", "user", "assistant", "tool")}
            self.roles = (
                standard | {t: t for t in ds.roles} | {src: t for t, sources in ds.roles.items() for src in sources}
            )
        else:
            self.roles = DEFAULT_ROLES
        to_train = ds.roles_to_train if ds.roles_to_train is not None else ["assistant"]
        self.roles_to_train = {self.roles.get(r, r) for r in to_train}
        self.train_on_eos = ds.train_on_eos or "turn"
        self.train_on_eot = ds.train_on_eot or self.train_on_eos
        eot_tokens = list(ctx.config.eot_tokens or [tok.eos_token])
        self.eos = ctx.eos_id()
        self.eot_ids = {self.single_token(t) for t in eot_tokens}
        if self.eos in self.eot_ids and self.train_on_eos != self.train_on_eot:
            raise JobSpecError(
                f"train_on_eos ({self.train_on_eos}) and train_on_eot ({self.train_on_eot}) disagree, and eos_token is "
                "one of eot_tokens",
                hint="set them equal, or leave train_on_eot unset",
            )
        self.field_system = ds.field_system or "system"
        self.field_tools = ds.field_tools or "tools"
        self.drop_system = bool(ds.drop_system_message)
        self.default_system = ctx.config.default_system_message

    def single_token(self, text: str) -> int:
        ids = self.ctx.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise JobSpecError(
                f"end-of-turn token {text!r} is {len(ids)} tokens in this tokenizer, not one",
                hint="add it under `tokens:` or fix eot_tokens",
            )
        return ids[0]

    # ---- rows → messages ------------------------------------------------------------------------
    def trained(self, role: str, flag: Any) -> bool:
        return bool(flag) if flag is not None else (self.ctx.train_on_inputs or role in self.roles_to_train)

    def conversation(self, row: dict[str, Any], index: int) -> tuple[list[dict[str, Any]], list[bool]]:
        raw = row.get(self.field_messages)
        if not isinstance(raw, list) or not raw:
            raise self.ctx.row_error(index, self.field_messages, "expected a non-empty list of messages")
        messages, train = [], []
        for k, m in enumerate(raw):
            where = f"{self.field_messages}[{k}]"
            if not isinstance(m, dict):
                raise self.ctx.row_error(index, where, f"expected a message object, got {type(m).__name__}")
            source_role = m.get(self.role_key)
            if source_role is None:
                raise self.ctx.row_error(index, f"{where}.{self.role_key}", "missing role")
            role = self.roles.get(source_role)
            if role is None:
                raise self.ctx.row_error(
                    index,
                    f"{where}.{self.role_key}",
                    f"unknown role {source_role!r}",
                    hint=(
                        f"map it with `roles:` in the dataset entry (e.g. roles: {{assistant: [{source_role}]}}); "
                        f"known roles: {', '.join(sorted(self.roles))}"
                    ),
                )
            content = m.get(self.content_key)
            if content is None and m.get("tool_calls"):
                content = ""
            if not isinstance(content, str):
                problem = (
                    "missing content" if content is None else f"content must be text, got {type(content).__name__}"
                )
                raise self.ctx.row_error(index, f"{where}.{self.content_key}", problem)
            message = {"role": role, "content": content}
            message |= {key: without_nulls(m[key]) for key in CARRIED_KEYS if m.get(key) is not None}
            if "tool_calls" in message:
                message["tool_calls"] = tool_calls(self.ctx, message["tool_calls"], index, f"{where}.tool_calls")
            message |= {key: m[src] for key, src in self.extra_keys.items() if m.get(src) is not None}
            messages.append(message)
            train.append(self.trained(role, m.get(self.training_key) if self.training_key else None))
        system = row.get(self.field_system)
        if isinstance(system, str) and system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
            train.insert(0, self.trained("system", None))
        if self.drop_system and messages[0]["role"] == "system":
            messages, train = messages[1:], train[1:]
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.default_system})
            train.insert(0, self.trained("system", None))
        if not messages:
            raise self.ctx.row_error(index, self.field_messages, "no messages left after drop_system_message")
        return messages, train

    def render(self, messages: list[dict[str, Any]], tools: Any, index: int) -> str:
        try:
            return self.ctx.tokenizer.apply_chat_template(
                messages, tools=tools or None, chat_template=self.template, tokenize=False
            )
        except Exception as e:  # jinja2 errors and the template's raise_exception: the row is the problem
            raise self.ctx.row_error(
                index, self.field_messages, f"the chat template rejected this conversation: {e}"
            ) from e

    # ---- where each content lies in the rendered text -------------------------------------------
    def content_spans(
        self, messages: list[dict[str, Any]], tools: Any, full: str, index: int
    ) -> list[tuple[int, int] | None]:
        contents = [m["content"] for m in messages]
        marks = [chr(SENTINEL_BASE + k) for k in range(len(messages))]
        if PRIVATE_USE.search("".join(contents)) or PRIVATE_USE.search(self.template):  # rare: pick unused ones
            taken = set("".join(contents)) | set(self.template)
            marks = [chr(c) for c in range(SENTINEL_BASE, SENTINEL_BASE + 0xFFFD) if chr(c) not in taken][
                : len(messages)
            ]
        marked = self.render([{**m, "content": s} for m, s in zip(messages, marks)], tools, index)
        for texts in (contents, [c.strip() for c in contents]):
            spans = substituted_spans(marked, marks, texts, full)
            if spans is not None:
                break
        else:
            spans = [self.diff_span(messages, tools, full, k, marks[0], index) for k in range(len(messages))]
        return [
            self.tool_call_span(messages, tools, full, k, marks[0], spans[k], index)
            if messages[k].get("tool_calls")
            else spans[k]
            for k in range(len(messages))
        ]

    def tool_call_span(
        self,
        messages: list[dict[str, Any]],
        tools: Any,
        full: str,
        k: int,
        mark: str,
        content: tuple[int, int] | None,
        index: int,
    ) -> tuple[int, int]:
        """What the template renders for message k's content and tool calls together."""
        bare = {key: v for key, v in messages[k].items() if key != "tool_calls"}
        probe = self.render([*messages[:k], {**bare, "content": mark}, *messages[k + 1 :]], tools, index)
        a, b = differing_span(full, probe)
        if (a, b) == content or a >= b:  # nothing but the content differs: the template drops tool calls
            raise self.ctx.row_error(
                index,
                f"{self.field_messages}[{k}].tool_calls",
                "the chat template does not render tool calls, so they would be dropped from training",
                hint=(
                    "use the model's own template (chat_template: tokenizer_default) or another that renders "
                    "`tool_calls`"
                ),
            )
        if content is not None and content[0] < content[1] and not (a <= content[0] and content[1] <= b):
            raise self.ctx.row_error(
                index,
                f"{self.field_messages}[{k}].tool_calls",
                "the chat template renders this message's tool calls apart from its content, so the span to train "
                "cannot be located exactly",
                hint=(
                    "use a template that renders an assistant message's content and tool calls together "
                    "(chat_template_jinja)"
                ),
            )
        return a, b

    def diff_span(
        self, messages: list[dict[str, Any]], tools: Any, full: str, k: int, mark: str, index: int
    ) -> tuple[int, int] | None:
        probe = self.render([*messages[:k], {**messages[k], "content": mark}, *messages[k + 1 :]], tools, index)
        if probe == full:
            return None  # the template does not show this content
        a, b = differing_span(full, probe)
        if a < b and full[a:b] not in messages[k]["content"]:
            raise self.ctx.row_error(
                index,
                f"{self.field_messages}[{k}].{self.content_key}",
                "the chat template changes this message's text depending on its content, so its tokens cannot be "
                "located exactly",
                hint=(
                    "use a template that inserts message content unchanged (chat_template_jinja), or set the "
                    "message's training flag to false"
                ),
            )
        return a, b

    # ---- tokens and labels ----------------------------------------------------------------------
    def token_ranges(
        self,
        spans: list[tuple[int, int] | None],
        offsets: list[tuple[int, int]],
        full: str,
        train: list[bool],
        index: int,
    ) -> list[tuple[int, int] | None]:
        starts = [o[0] for o in offsets]
        ends = [o[1] for o in offsets]
        ranges: list[tuple[int, int] | None] = []
        previous_end = 0  # in characters: the template must render messages in order
        for k, span in enumerate(spans):
            if span is None:
                if train[k]:
                    raise self.ctx.row_error(
                        index,
                        f"{self.field_messages}[{k}]",
                        "this message is trained but the chat template does not render it",
                    )
                ranges.append(None)
                continue
            a, b = span
            if a == b:
                t0 = t1 = bisect_left(starts, a)
            else:
                t0, t1 = bisect_right(ends, a), bisect_left(starts, b)
                straddle_start = starts[t0] < a and full[starts[t0] : a].strip()
                straddle_end = ends[t1 - 1] > b and full[b : ends[t1 - 1]].strip()
                if train[k] and (straddle_start or straddle_end):
                    raise self.ctx.row_error(
                        index,
                        f"{self.field_messages}[{k}]",
                        "the tokenizer merges this message's first or last characters with the template's text into "
                        "one token, so the trained span is not exact",
                        hint="use a chat template that separates content from markup with a special token or newline",
                    )
            if a < previous_end:
                raise self.ctx.row_error(
                    index,
                    f"{self.field_messages}[{k}]",
                    "the template renders messages out of order; cannot mask exactly",
                )
            previous_end = b
            ranges.append((t0, t1))
        return ranges

    def labels(self, ids: list[int], ranges: list[tuple[int, int] | None], train: list[bool]) -> list[int]:
        labels = [IGNORE] * len(ids)
        located = [(k, r) for k, r in enumerate(ranges) if r is not None]
        passes = [("eot", self.eot_ids, self.train_on_eot)]
        if self.eos not in self.eot_ids:
            passes.append(("eos", {self.eos}, self.train_on_eos))
        last_found = {kind: -1 for kind, _, _ in passes}
        for n, (k, (t0, t1)) in enumerate(located):
            if train[k]:
                labels[t0:t1] = ids[t0:t1]
            limit = located[n + 1][1][0] if n + 1 < len(located) else len(ids)
            for kind, wanted, mode in passes:
                j = next((j for j in range(t1, limit) if ids[j] in wanted), -1)
                if j < 0:
                    continue
                if train[k]:
                    last_found[kind] = j
                if mode == "all" or (mode == "turn" and train[k]):
                    labels[j] = ids[j]
        for kind, _, mode in passes:
            if mode == "last" and last_found[kind] >= 0:
                labels[last_found[kind]] = ids[last_found[kind]]
        return labels

    def tokenize(self, rows: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[list[Sample]]:
        prepared = []
        for row, index in zip(rows, indices):
            messages, train = self.conversation(row, index)
            tools = tool_definitions(self.ctx, row.get(self.field_tools), index, self.field_tools)
            full = self.render(messages, tools, index)
            prepared.append((full, self.content_spans(messages, tools, full, index), train))
        # the backend directly: ids and character offsets in one pass, without the Python wrapper's copies
        encodings = self.ctx.tokenizer.backend_tokenizer.encode_batch(
            [p[0] for p in prepared], add_special_tokens=False
        )
        out = []
        for (full, spans, train), index, enc in zip(prepared, indices, encodings):
            ids = enc.ids
            ranges = self.token_ranges(spans, enc.offsets, full, train, index)
            out.append([Sample(ids, self.labels(ids, ranges, train))])
        return out


def substituted_spans(
    marked: str, marks: list[str], texts: list[str], full: str
) -> list[tuple[int, int] | None] | None:
    """Content spans in `full` when putting `texts` in place of `marks` in `marked` gives `full`; else None."""
    parts = re.split("([" + "".join(marks) + "])", marked)
    slot = {m: k for k, m in enumerate(marks)}
    spans: list[tuple[int, int] | None] = [None] * len(marks)
    pieces, length = [], 0
    for n, part in enumerate(parts):
        if n % 2:
            k = slot[part]
            if spans[k] is not None:
                return None  # the template shows this content twice
            part = texts[k]
            spans[k] = (length, length + len(part))
        pieces.append(part)
        length += len(part)
    return spans if "".join(pieces) == full else None


def differing_span(full: str, probe: str) -> tuple[int, int]:
    """The part of `full` that differs from `probe` (common prefix and suffix removed, never overlapping)."""
    p = len(os.path.commonprefix([full, probe]))
    limit = min(len(full), len(probe)) - p
    q = len(os.path.commonprefix([full[::-1], probe[::-1]])) if limit > 0 else 0
    return p, len(full) - min(q, limit)

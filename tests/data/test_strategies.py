"""Golden tests of the instruction and text strategies: expected ids/labels from the prompt formats
written out here and tokenised piece by piece (BOS/EOS by id), never captured from our output."""

from __future__ import annotations

import pytest

from tests.data.conftest import context
from worker.data.strategies import IGNORE, build_strategy
from worker.errors import DataError, JobSpecError

SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ROW = {"instruction": "sort these", "input": "", "output": "1 2 3"}
ROW_WITH_INPUT = {"instruction": "sort these", "input": "3 1 2", "output": "1 2 3"}

PROMPTS = {  # type -> (prompt without input, prompt with input), as axolotl's AlpacaPrompter writes them
    "alpaca": (
        f"{SYSTEM_NO_INPUT}\n\n### Instruction:\nsort these\n\n### Response:\n",
        f"{SYSTEM_INPUT}\n\n### Instruction:\nsort these\n\n### Input:\n3 1 2\n\n### Response:\n",
    ),
    "alpaca:chat": (
        f"SYSTEM: {SYSTEM_NO_INPUT}\nUSER: sort these\nASSISTANT:",
        f"SYSTEM: {SYSTEM_INPUT}\nUSER: sort these\n3 1 2\nASSISTANT:",
    ),
    "alpaca:chatml": (
        f"<|im_start|>system\n{SYSTEM_NO_INPUT}<|im_end|>\n"
        "<|im_start|>user\nsort these<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>system\n{SYSTEM_INPUT}<|im_end|>\n"
        "<|im_start|>user\nsort these\n3 1 2<|im_end|>\n<|im_start|>assistant\n",
    ),
    "alpaca:phi": (
        f"<|system|>\n{SYSTEM_NO_INPUT}<|end|>\n<|user|>\nsort these<|end|>\n<|assistant|>\n",
        f"<|system|>\n{SYSTEM_INPUT}<|end|>\n<|user|>\nsort these<|end|>3 1 2<|assistant|>",
    ),
}


def one(tok, dataset, row, **keys):
    [[sample]] = build_strategy(context(tok, dataset, **keys)).tokenize([row], [0])
    return sample.input_ids, sample.labels


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("kind", sorted(PROMPTS))
@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_styles(llama3_tok, kind, with_input):
    tok = llama3_tok  # adds BOS itself: BOS starts the prompt, never the response
    prompt = [tok.bos_token_id] + enc(tok, PROMPTS[kind][with_input])
    response = enc(tok, "1 2 3") + [tok.eos_token_id]
    row = ROW_WITH_INPUT if with_input else ROW
    assert one(tok, {"type": kind}, row) == (prompt + response, [IGNORE] * len(prompt) + response)


@pytest.mark.parametrize("mode", ["turn", "all", "last", "none"])
def test_alpaca_always_trains_the_response_eos(chatml_tok, mode):
    # train_on_eos is chat_template's; axolotl's instruction strategies never read it
    tok = chatml_tok
    prompt = enc(tok, PROMPTS["alpaca"][0])
    response = enc(tok, "1 2 3") + [tok.eos_token_id]
    assert one(tok, {"type": "alpaca", "train_on_eos": mode}, ROW) == (
        prompt + response,
        [IGNORE] * len(prompt) + response,
    )
    assert one(tok, {"type": "alpaca", "train_on_eos": mode}, ROW, train_on_inputs=True) == (
        prompt + response,
        prompt + response,
    )


def test_user_defined_format(chatml_tok):
    tok = chatml_tok
    spec = {
        "field_instruction": "q",
        "field_input": "ctx",
        "field_output": "a",
        "field_system": "sys",
        "format": "[Q] {instruction} ({input})\n[A] ",
        "no_input_format": "[Q] {instruction}\n[A] ",
        "system_format": "<{system}>\n",
    }
    row = {"q": "Hi there", "ctx": "", "a": "hello world", "sys": "Be brief."}
    prompt = enc(tok, "<Be brief.>\n[Q] Hi there\n[A] ")
    response = enc(tok, "hello world") + [tok.eos_token_id]
    assert one(tok, {"type": spec}, row) == (prompt + response, [IGNORE] * len(prompt) + response)
    row = {"q": "Hi there", "ctx": "3 1 2", "a": "hello world", "sys": None}
    prompt = enc(tok, "[Q] Hi there (3 1 2)\n[A] ")
    assert one(tok, {"type": spec}, row) == (prompt + response, [IGNORE] * len(prompt) + response)


def test_completion_splits_into_sequence_len_chunks(llama3_tok):
    tok = llama3_tok
    text = "hello world answer yes no. The quick brown fox jumps over the lazy dog."
    ids = [tok.bos_token_id] + enc(tok, text) + [tok.eos_token_id]
    assert len(ids) > 16
    samples = build_strategy(context(tok, {"type": "completion", "field": "body"}, sequence_len=8)).tokenize(
        [{"body": text}], [0]
    )[0]
    assert [s.input_ids for s in samples] == [ids[k : k + 8] for k in range(0, len(ids), 8)]
    assert all(s.labels == s.input_ids for s in samples)


def test_input_output_segments_add_nothing(llama3_tok):
    tok = llama3_tok  # adds BOS itself: input_output still adds none (the segments are the whole text)
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    row = {
        "segments": [
            {"label": False, "text": "Q: sort 3 1 2\n"},
            {"label": True, "text": "A: 1 2 3"},
            {"label": False, "text": "\n"},
        ]
    }
    first, second, third = enc(tok, "Q: sort 3 1 2\n"), enc(tok, "A: 1 2 3"), enc(tok, "\n")
    want_labels = [IGNORE] * len(first) + second + [IGNORE] * len(third)
    assert one(tok, {"type": "input_output"}, row) == (first + second + third, want_labels)
    with_bos = {
        "segments": [{"label": False, "text": "<|begin_of_text|>"}, *row["segments"]]
    }  # a user who wants BOS writes it
    assert one(tok, {"type": "input_output"}, with_bos) == (
        [tok.bos_token_id] + first + second + third,
        [IGNORE] + want_labels,
    )


@pytest.mark.parametrize(
    "dataset, row, match",
    [
        ({"type": "alpaca"}, {"instruction": None, "output": "x"}, "row 0: field 'instruction': missing"),
        ({"type": "alpaca"}, {"instruction": "x", "output": 3}, "row 0: field 'output': expected text"),
        ({"type": "completion"}, {"text": None}, "row 0: field 'text': missing"),
        (
            {"type": "input_output"},
            {"segments": [{"text": "x", "label": "yes"}]},
            r"row 0: field 'segments\[0\]\.label'",
        ),
    ],
)
def test_bad_rows(chatml_tok, dataset, row, match):
    with pytest.raises(DataError, match=match):
        build_strategy(context(chatml_tok, dataset)).tokenize([row], [0])


def test_unknown_strategy_and_dict_without_format(chatml_tok):
    with pytest.raises(JobSpecError, match="not available"):
        build_strategy(context(chatml_tok, {"type": "metharme"}))
    with pytest.raises(JobSpecError, match="needs `format`"):
        build_strategy(context(chatml_tok, {"type": {"field_instruction": "q"}}))

"""Golden tests of the chat_template strategy: expected input_ids/labels built by hand from the
template's known pieces, each tokenised on its own (special tokens by id), never from our output.
"""

from __future__ import annotations

import pytest

from tests.data.conftest import context
from worker.data.strategies import IGNORE, build_strategy
from worker.errors import DataError, JobSpecError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "sort 3 1 2"},
    {"role": "assistant", "content": "1 2 3"},
]


def expected(tok, pieces):
    """pieces: (text or special-token string, trained?) in order → (input_ids, labels)."""
    ids, labels = [], []
    for piece, trained in pieces:
        if piece in tok.all_special_tokens:
            part = [tok.convert_tokens_to_ids(piece)]
        else:
            part = tok.encode(piece, add_special_tokens=False)
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def run(tok, messages, dataset=None, **keys):
    strategy = build_strategy(context(tok, {"type": "chat_template", **(dataset or {})}, **keys))
    [[sample]] = strategy.tokenize([{"messages": messages}], [0])
    return sample.input_ids, sample.labels


def chatml_pieces(messages, content_trained, end_trained):
    pieces = []
    for m, c, e in zip(messages, content_trained, end_trained):
        pieces += [
            ("<|im_start|>", False),
            (m["role"] + "\n", False),
            (m["content"], c),
            ("<|im_end|>", e),
            ("\n", False),
        ]
    return pieces


# which contents / end tokens are trained, per message (system, user, assistant, user, assistant)
EOS_MODES = {
    "turn": ([0, 0, 1, 0, 1], [0, 0, 1, 0, 1]),
    "all": ([0, 0, 1, 0, 1], [1, 1, 1, 1, 1]),
    "last": ([0, 0, 1, 0, 1], [0, 0, 0, 0, 1]),
    "none": ([0, 0, 1, 0, 1], [0, 0, 0, 0, 0]),
}


@pytest.mark.parametrize("mode", sorted(EOS_MODES))
def test_chatml_train_on_eos_modes(chatml_tok, mode):
    contents, ends = EOS_MODES[mode]
    want = expected(chatml_tok, chatml_pieces(CONVERSATION, contents, ends))
    assert run(chatml_tok, CONVERSATION, {"train_on_eos": mode}) == want


def test_chatml_default_is_turn(chatml_tok):
    assert run(chatml_tok, CONVERSATION) == expected(chatml_tok, chatml_pieces(CONVERSATION, *EOS_MODES["turn"]))


def llama3_pieces(tok, messages, content_trained, end_trained):
    pieces = [("<|begin_of_text|>", False)]
    for m, c, e in zip(messages, content_trained, end_trained):
        pieces += [
            ("<|start_header_id|>", False),
            (m["role"], False),
            ("<|end_header_id|>", False),
            ("\n\n", False),
            (m["content"].strip(), c),
            ("<|eot_id|>", e),
        ]
    return pieces


@pytest.mark.parametrize("mode", sorted(EOS_MODES))
def test_llama3_named_template_trims_and_masks(llama3_tok, mode):
    # the named llama3 template trims content (`| trim`): the trained span is the trimmed text
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["content"] = "  hello world \n"
    for m in messages:  # precondition of the hand derivation: "\n\n" + content tokenises as the two parts
        assert llama3_tok.encode("\n\n" + m["content"].strip(), add_special_tokens=False) == llama3_tok.encode(
            "\n\n", add_special_tokens=False
        ) + llama3_tok.encode(m["content"].strip(), add_special_tokens=False)
    contents, ends = EOS_MODES[mode]
    want = expected(llama3_tok, llama3_pieces(llama3_tok, messages, contents, ends))
    assert run(llama3_tok, messages, {"train_on_eos": mode}, chat_template="llama3") == want


def test_roles_to_train_training_flag_and_train_on_inputs(chatml_tok):
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["training"] = False  # the per-message flag wins over roles_to_train
    got = run(chatml_tok, messages, {"roles_to_train": ["assistant", "user"], "message_field_training": "training"})
    assert got == expected(chatml_tok, chatml_pieces(CONVERSATION, [0, 1, 0, 1, 1], [0, 1, 0, 1, 1]))
    # without message_field_training no flag is read, as in axolotl
    got = run(chatml_tok, messages, {"roles_to_train": ["assistant", "user"]})
    assert got == expected(chatml_tok, chatml_pieces(CONVERSATION, [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]))
    got = run(chatml_tok, CONVERSATION, train_on_inputs=True)
    assert got == expected(chatml_tok, chatml_pieces(CONVERSATION, [1] * 5, [1] * 5))


def test_eot_tokens_apart_from_eos(chatml_tok):
    tok = chatml_tok.__class__.from_pretrained(chatml_tok.name_or_path)
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})  # eos no longer ends a turn in the template
    got = run(tok, CONVERSATION, {"train_on_eot": "turn", "train_on_eos": "none"}, eot_tokens=["<|im_end|>"])
    assert got == expected(tok, chatml_pieces(CONVERSATION, *EOS_MODES["turn"]))
    got = run(tok, CONVERSATION, {"train_on_eot": "last", "train_on_eos": "all"}, eot_tokens=["<|im_end|>"])
    assert got == expected(tok, chatml_pieces(CONVERSATION, *EOS_MODES["last"]))


@pytest.mark.parametrize("key", ["train_on_eos", "train_on_eot"])
def test_last_is_the_end_of_the_last_trained_turn(chatml_tok, key):
    # a conversation that ends on an untrained message: `last` trains the end of the last trained
    # one (the final answer), not the end of the trailing user message
    tok = chatml_tok.__class__.from_pretrained(chatml_tok.name_or_path)
    keys = {}
    if key == "train_on_eot":
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
        keys = {"eot_tokens": ["<|im_end|>"]}
    messages = [*CONVERSATION, {"role": "user", "content": "thanks"}]
    got = run(tok, messages, {key: "last"}, **keys)
    assert got == expected(tok, chatml_pieces(messages, [0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 0]))


def test_eos_in_eot_tokens_with_conflicting_modes_is_refused(chatml_tok):
    with pytest.raises(JobSpecError, match="disagree"):
        build_strategy(context(chatml_tok, {"type": "chat_template", "train_on_eos": "turn", "train_on_eot": "all"}))


def test_sharegpt_keys_roles_mapping_and_legacy_fields(chatml_tok):
    sharegpt = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in CONVERSATION
    ]
    want = expected(chatml_tok, chatml_pieces(CONVERSATION, *EOS_MODES["turn"]))
    mapped = {
        "message_property_mappings": {"role": "from", "content": "value"},
        "roles": {"user": ["human"], "assistant": ["gpt"], "system": ["system"]},
    }
    assert run(chatml_tok, sharegpt, mapped) == want
    strategy = build_strategy(
        context(chatml_tok, {"type": "chat_template", "field_messages": "conversations", **mapped})
    )
    [[sample]] = strategy.tokenize([{"conversations": sharegpt}], [0])
    assert (sample.input_ids, sample.labels) == want
    assert (
        run(chatml_tok, sharegpt, {"message_field_role": "from", "message_field_content": "value"}) == want
    )  # default roles know human/gpt


def test_system_message_handling(chatml_tok):
    no_system = CONVERSATION[1:]
    dropped = run(chatml_tok, CONVERSATION, {"drop_system_message": True})
    assert dropped == expected(chatml_tok, chatml_pieces(no_system, [0, 1, 0, 1], [0, 1, 0, 1]))
    default = run(chatml_tok, no_system, default_system_message="Be brief.")
    assert default == expected(chatml_tok, chatml_pieces(CONVERSATION, *EOS_MODES["turn"]))
    strategy = build_strategy(context(chatml_tok, {"type": "chat_template", "field_system": "sys"}))
    [[sample]] = strategy.tokenize([{"messages": no_system, "sys": "Be brief."}], [0])
    assert (sample.input_ids, sample.labels) == expected(chatml_tok, chatml_pieces(CONVERSATION, *EOS_MODES["turn"]))


# a Qwen3-like template: the reasoning of earlier assistant turns is dropped (it rewrites them)
REWRITING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
)


def test_template_that_rewrites_earlier_turns_is_masked_exactly(chatml_tok):
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "<think>no</think>hello world"},
        {"role": "user", "content": "sort 3 1 2"},
        {"role": "assistant", "content": "<think>yes</think>1 2 3"},
    ]
    rendered = [
        dict(messages[0]),
        {"role": "assistant", "content": "hello world"},
        dict(messages[2]),
        dict(messages[3]),
    ]
    want = expected(chatml_tok, chatml_pieces(rendered, [0, 1, 0, 1], [0, 1, 0, 1]))
    assert run(chatml_tok, messages, {"chat_template_jinja": REWRITING}) == want


def test_template_that_branches_on_content_is_an_error_naming_the_row(chatml_tok):
    branching = (
        "{% for m in messages %}{% if 'secret' in m['content'] %}[hidden]{% else %}{{ m['content'] }}{% endif %}"
        "{{ eos_token }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "secret hello"}]
    strategy = build_strategy(context(chatml_tok, {"type": "chat_template", "chat_template_jinja": branching}))
    with pytest.raises(DataError, match=r"row 7: field 'messages\[1\]\.content'") as e:
        strategy.tokenize([{"messages": messages}], [7])
    assert e.value.details["row"] == 7


@pytest.mark.parametrize(
    "messages, field, problem",
    [
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role", "unknown role 'robot'"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content", "missing content"),
        ([{"content": "x"}], r"messages\[0\]\.role", "missing role"),
        ([], "messages", "non-empty list"),
    ],
)
def test_bad_rows_name_row_and_field(chatml_tok, messages, field, problem):
    strategy = build_strategy(context(chatml_tok))
    with pytest.raises(DataError, match=rf"/data/x\.jsonl: row 3: field '{field}': .*{problem}"):
        strategy.tokenize([{"messages": messages}], [3])


def test_template_rejection_names_the_row(chatml_tok):
    strategy = build_strategy(context(chatml_tok, chat_template="gemma"))  # gemma refuses a system role
    with pytest.raises(DataError, match="row 0: .*System role not supported"):
        strategy.tokenize([{"messages": CONVERSATION}], [0])


def test_unknown_named_template(chatml_tok):
    with pytest.raises(JobSpecError, match="unknown chat_template 'nope'"):
        build_strategy(context(chatml_tok, chat_template="nope"))


def test_tokenizer_without_template_needs_one_named(chatml_tok):
    tok = chatml_tok.__class__.from_pretrained(chatml_tok.name_or_path)
    tok.chat_template = None
    with pytest.raises(JobSpecError, match="the tokenizer has no chat template"):
        build_strategy(context(tok))
    fallback = build_strategy(context(tok, chat_template="tokenizer_default_fallback_chatml"))
    [[sample]] = fallback.tokenize([{"messages": CONVERSATION}], [0])
    assert (sample.input_ids, sample.labels) == expected(chatml_tok, chatml_pieces(CONVERSATION, *EOS_MODES["turn"]))

"""Goldens of the preference/RL dataset types: each row's prompt, chosen and rejected tokenised with the
chat template piece by piece (expected ids built by hand, as in test_chat_template), and the prepared
cache's layout (pairs back to back, position_ids restarting, kto flags, grpo answers)."""

from __future__ import annotations

import json

import pytest

from schemas.config import TrainingConfig
from tests.data.conftest import context
from tests.data.test_chat_template import chatml_pieces, expected, llama3_pieces
from worker.data.preference import build_rl_strategy
from worker.data.strategies import IGNORE
from worker.errors import DataError

SYSTEM, PROMPT, GOOD, BAD = "Be brief.", "sort 3 1 2", "1 2 3", "hello world"


def pair_golden(pieces_of, tok, system=None):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": PROMPT}]
    out = []
    for answer in (GOOD, BAD):
        messages = [*prompt, {"role": "assistant", "content": answer}]
        flags = [0] * len(prompt) + [1]
        out.append(expected(tok, pieces_of(messages, flags, flags)))
    return out


def tokenize(tok, dataset, row, rl="dpo", **keys):
    strategy = build_rl_strategy(context(tok, dataset, rl=rl, adapter="lora", **keys))
    [sample] = strategy.tokenize_rows([row], [0])
    return sample


ROWS = {  # axolotl's documented row shape of each layout (docs/rlhf.qmd)
    "chatml.intel": {"system": SYSTEM, "question": PROMPT, "chosen": GOOD, "rejected": BAD},
    "chatml.prompt_pairs": {"system": SYSTEM, "prompt": PROMPT, "chosen": GOOD, "rejected": BAD},
    "chatml.icr": {"system": SYSTEM, "input": PROMPT, "chosen": GOOD, "rejected": BAD},
    "chatml.argilla": {"system": SYSTEM, "instruction": PROMPT, "chosen_response": GOOD, "rejected_response": BAD},
    "chatml.ultra": {
        "system": SYSTEM,
        "prompt": PROMPT,
        "chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": BAD}],
    },
    "chatml": {"system": SYSTEM, "question": PROMPT, "chosen": GOOD, "rejected": BAD},
}


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_chatml_pair_layouts_mask_all_but_the_answer_and_its_end_of_turn(chatml_tok, kind):
    sample = tokenize(chatml_tok, {"type": kind}, ROWS[kind])
    chosen, rejected = pair_golden(chatml_pieces, chatml_tok, SYSTEM)
    assert (sample.chosen.input_ids, sample.chosen.labels) == chosen
    assert (sample.rejected.input_ids, sample.rejected.labels) == rejected


def test_argilla_chat_takes_the_first_user_turn_and_has_no_system(chatml_tok):
    row = {
        "chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": BAD}],
    }
    sample = tokenize(chatml_tok, {"type": "chatml.argilla_chat"}, row)
    chosen, rejected = pair_golden(chatml_pieces, chatml_tok)
    assert (sample.chosen.input_ids, sample.chosen.labels) == chosen and (
        sample.rejected.input_ids,
        sample.rejected.labels,
    ) == rejected


def test_llama3_family_uses_the_llama3_template_on_any_tokenizer(llama3_tok):
    sample = tokenize(llama3_tok, {"type": "llama3.intel"}, ROWS["chatml.intel"])
    chosen, rejected = pair_golden(lambda m, c, e: llama3_pieces(llama3_tok, m, c, e), llama3_tok, SYSTEM)
    assert (sample.chosen.input_ids, sample.chosen.labels) == chosen and (
        sample.rejected.input_ids,
        sample.rejected.labels,
    ) == rejected


def test_chat_template_default_reads_the_configured_fields_and_roles(chatml_tok):
    """axolotl's llama-3 DPO examples: field_messages / field_chosen / field_rejected, mapped role keys."""
    dataset = {
        "type": "chat_template.default",
        "field_messages": "conversation",
        "field_chosen": "good",
        "field_rejected": "bad",
        "message_property_mappings": {"role": "from", "content": "value"},
        "roles": {"system": ["system"], "user": ["human"], "assistant": ["gpt"]},
    }
    row = {
        "conversation": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": PROMPT}],
        "good": {"from": "gpt", "value": GOOD},
        "bad": {"from": "gpt", "value": BAD},
    }
    sample = tokenize(chatml_tok, dataset, row, chat_template="chatml")
    chosen, rejected = pair_golden(chatml_pieces, chatml_tok, SYSTEM)
    assert (sample.chosen.input_ids, sample.chosen.labels) == chosen and (
        sample.rejected.input_ids,
        sample.rejected.labels,
    ) == rejected


def test_dict_form_is_raw_text_with_eos(chatml_tok):
    dataset = {
        "type": {
            "field_prompt": "q",
            "field_chosen": "a",
            "field_rejected": "b",
            "prompt_format": "Q: {prompt}\nA:",
            "chosen_format": " {chosen}",
            "rejected_format": " {rejected}",
        }
    }
    sample = tokenize(chatml_tok, dataset, {"q": PROMPT, "a": GOOD, "b": BAD})
    p = chatml_tok.encode(f"Q: {PROMPT}\nA:", add_special_tokens=False)
    for got, answer in ((sample.chosen, GOOD), (sample.rejected, BAD)):
        a = chatml_tok.encode(" " + answer, add_special_tokens=False) + [chatml_tok.eos_token_id]
        assert (got.input_ids, got.labels) == (p + a, [IGNORE] * len(p) + a)


def test_kto_completion_and_label(chatml_tok):
    row = {"prompt": PROMPT, "completion": GOOD, "label": False}
    sample = tokenize(chatml_tok, {"type": "chatml.prompt_pairs"}, row, rl="kto")
    chosen, _ = pair_golden(chatml_pieces, chatml_tok)
    assert (
        (sample.chosen.input_ids, sample.chosen.labels) == chosen
        and sample.rejected is None
        and sample.desirable is False
    )
    with pytest.raises(DataError, match="row 0: field 'label': expected true"):
        tokenize(chatml_tok, {"type": "chatml.prompt_pairs"}, {**row, "label": "yes"}, rl="kto")


def test_grpo_prompt_ends_with_the_generation_header(chatml_tok):
    sample = tokenize(
        chatml_tok,
        {"type": "prompt_answer"},
        {"prompt": PROMPT, "answer": 123},
        rl="grpo",
        chat_template="chatml",
        trl={"reward_funcs": ["exact_match"]},
    )
    want, _ = expected(
        chatml_tok,
        [
            ("<|im_start|>", 0),
            ("user\n", 0),
            (PROMPT, 0),
            ("<|im_end|>", 0),
            ("\n", 0),
            ("<|im_start|>", 0),
            ("assistant\n", 0),
        ],
    )
    assert sample.chosen.input_ids == want and sample.answer == "123"


def test_a_missing_field_names_the_row_and_the_field(chatml_tok):
    with pytest.raises(DataError, match="row 0: field 'rejected': missing"):
        tokenize(chatml_tok, {"type": "chatml.intel"}, {"question": PROMPT, "chosen": GOOD})


def test_prepared_pairs_are_packed_chosen_then_rejected(tokenizer_dir, volume):
    """Through the real preprocess: micro_batch_size pairs per row, positions restart per sequence."""
    from datasets import load_from_disk

    from worker.data.pipeline import prepare

    rows = [{"question": f"{PROMPT} {i}", "chosen": GOOD, "rejected": BAD + " no" * (i % 3)} for i in range(10)]
    rows.append({"question": "long", "chosen": GOOD, "rejected": "yes " * 200})  # too long: the whole pair goes
    path = volume / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainingConfig(
        base_model=str(tokenizer_dir),
        learning_rate=1e-4,
        rl="dpo",
        adapter="lora",
        micro_batch_size=4,
        sequence_len=64,
        datasets=[{"path": str(path), "type": "chatml.intel"}],
    )
    summary = prepare(cfg)
    assert summary["rows"]["dropped"] == {"too_long": 1} and summary["rows"]["train"] == 10 and summary["rl"] == "dpo"
    train = load_from_disk(summary["cache_dir"] + "/train")
    assert [sum(1 for p in r["position_ids"] if p == 0) for r in train] == [8, 8, 4]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for r in train:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        texts = [
            tok.decode([t for t, lab in zip(r["input_ids"][a:b], r["labels"][a:b]) if lab != IGNORE])
            for a, b in zip(starts, starts[1:])
        ]
        assert texts[0::2] == [GOOD + "<|im_end|>"] * (len(texts) // 2)
        assert all(t.startswith(BAD) for t in texts[1::2])


def test_prepared_kto_rows_carry_flags_and_grpo_rows_their_answers(tokenizer_dir, volume):
    from datasets import load_from_disk

    from worker.data.pipeline import prepare

    kto = volume / "kto.jsonl"
    kto.write_text(
        "".join(
            json.dumps({"prompt": f"{PROMPT} {i}", "completion": GOOD, "label": i % 3 == 0}) + "\n" for i in range(5)
        )
    )
    cfg = TrainingConfig(
        base_model=str(tokenizer_dir),
        learning_rate=1e-4,
        rl="kto",
        adapter="lora",
        micro_batch_size=2,
        sequence_len=64,
        shuffle_merged_datasets=False,
        datasets=[{"path": str(kto), "type": "chatml.prompt_pairs"}],
    )
    train = load_from_disk(prepare(cfg)["cache_dir"] + "/train")
    assert [r["desirable"] for r in train] == [[1, 0], [0, 1], [0]]
    assert [sum(1 for p in r["position_ids"] if p == 0) for r in train] == [2, 2, 1]

    grpo = volume / "grpo.jsonl"
    grpo.write_text("".join(json.dumps({"prompt": f"{PROMPT} {i}", "answer": f"é{i}"}) + "\n" for i in range(3)))
    cfg = TrainingConfig(
        base_model=str(tokenizer_dir),
        learning_rate=1e-4,
        rl="grpo",
        adapter="lora",
        sequence_len=64,
        chat_template="chatml",
        shuffle_merged_datasets=False,
        trl={"reward_funcs": ["exact_match"], "max_completion_length": 16},
        datasets=[{"path": str(grpo), "type": "prompt_answer"}],
    )
    summary = prepare(cfg)
    train = load_from_disk(summary["cache_dir"] + "/train")
    assert [bytes(r["answer_bytes"]).decode() for r in train] == ["é0", "é1", "é2"]
    assert all(set(r["labels"]) == {IGNORE} for r in train) and summary["packing"]["enabled"] is False

"""Goldens of EBFT's dataset types: each row tokenised piece by piece by hand (prompt masked, ground
truth trained), and the prepared cache's layout (one document per row; strided documents too short
for one block dropped and counted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from tests.data.conftest import context
from tests.data.test_chat_template import chatml_pieces, expected
from worker.data.ebft_rows import EbftRows
from worker.data.strategies import IGNORE

PROMPT, ANSWER = "sort 3 1 2", "1 2 3"


def tokenize(tok: Any, kind: str, row: dict[str, Any], mode: str = "strided") -> tuple[list[int], list[int]]:
    strategy = EbftRows(
        context(tok, {"type": kind}, rl="ebft", adapter="lora", chat_template="chatml", ebft={"mode": mode})
    )
    [sample] = strategy.tokenize_rows([row], [0])
    return sample.chosen.input_ids, sample.chosen.labels


def test_opencode_is_the_chat_prompt_then_the_assistant_ground_truth(chatml_tok):
    got = tokenize(chatml_tok, "ebft_opencode.transform", {"input": PROMPT, "output": ANSWER}, mode="structured")
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]
    assert got == expected(chatml_tok, chatml_pieces(messages, [0, 1], [0, 1]))


def test_strided_structured_is_raw_prompt_then_raw_completion(llama3_tok):
    ids, labels = tokenize(llama3_tok, "ebft_strided_structured.transform", {"input": PROMPT, "output": ANSWER})
    head = [llama3_tok.bos_token_id] + llama3_tok.encode(PROMPT, add_special_tokens=False)
    tail = llama3_tok.encode(ANSWER, add_special_tokens=False)
    assert (ids, labels) == (head + tail, [IGNORE] * len(head) + tail)


def test_strided_chat_trains_every_assistant_turn(chatml_tok):
    messages = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "reverse"},
        {"role": "assistant", "content": "3 2 1"},
    ]
    got = tokenize(chatml_tok, "ebft_strided_chat.transform", {"conversations": messages})
    assert got == expected(chatml_tok, chatml_pieces(messages, [0, 1, 0, 1], [0, 1, 0, 1]))


def test_pretrain_text_is_trained_whole(llama3_tok):
    ids, labels = tokenize(llama3_tok, "ebft_pretrain.transform", {"text": "hello world answer"})
    assert ids == [llama3_tok.bos_token_id] + llama3_tok.encode("hello world answer", add_special_tokens=False)
    assert labels == ids


def test_prepared_strided_rows_are_one_document_each_and_short_ones_are_dropped(tokenizer_dir: Path, volume: Path):
    from datasets import load_from_disk

    from worker.data.pipeline import prepare

    rows = [{"input": PROMPT, "output": " ".join(["yes no"] * n)} for n in (12, 1, 20)]
    path = volume / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainingConfig(
        base_model=str(tokenizer_dir),
        learning_rate=1e-4,
        rl="ebft",
        adapter="lora",
        sequence_len=128,
        micro_batch_size=2,
        shuffle_merged_datasets=False,
        ebft={"mode": "strided", "context_length": 4, "generate_max_len": 4, "stride": 4, "min_completion_prefix": 2},
        datasets=[{"path": str(path), "type": "ebft_strided_structured.transform"}],
    )
    summary = prepare(cfg)
    train = load_from_disk(summary["cache_dir"] + "/train")
    assert summary["rows"]["dropped"] == {"no_room_for_a_block": 1}  # 1 "yes no": prompt + 2 + 4 does not fit
    assert [len(r["input_ids"]) for r in train] == [len(r["labels"]) for r in train]
    assert len(train) == 2 and summary["packing"]["enabled"] is False
    for r in train:
        first = next(i for i, label in enumerate(r["labels"]) if label != IGNORE)
        assert r["position_ids"] == list(range(len(r["input_ids"])))
        assert r["labels"][first:] == r["input_ids"][first:] and set(r["labels"][:first]) == {IGNORE}

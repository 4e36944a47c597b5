"""Fixtures of the train tests: a tiny model whose tokenizer knows the task, and its caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import pack, successor_task, tokenize, write_cache


@pytest.fixture(scope="session")
def task_model_dir(tmp_path_factory) -> Path:
    from worker.devtools.tiny import build_model

    train, held = successor_task()
    text = [p + a for p, a in train[:200]]
    return build_model(tmp_path_factory.mktemp("tiny-task"), style="chatml", extra_text=text)


@pytest.fixture(scope="session")
def four_layer_model_dir(tmp_path_factory) -> Path:
    from worker.devtools.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-4-layers"), layers=4)


@pytest.fixture(scope="session")
def task_moe_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE (8 experts, top-2) with the task model's tokenizer."""
    from worker.devtools.tiny import build_model

    train, _ = successor_task()
    return build_model(
        tmp_path_factory.mktemp("tiny-moe"),
        style="chatml",
        extra_text=[p + a for p, a in train[:200]],
        arch="qwen3_moe",
        hidden=128,
        intermediate=256,
    )


@pytest.fixture(scope="session")
def task_rows(task_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task_model_dir)
    train, held = successor_task()
    return tokenize(tok, train), tokenize(tok, held), held


@pytest.fixture(scope="session")
def uneven_rows(task_model_dir) -> list[dict]:
    """The successor task with 2 to 6 digits, one sample a row: rows of several lengths, prompts masked."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task_model_dir)
    by_digits = [tokenize(tok, successor_task(seed=d, n_digits=d)[0][:12]) for d in range(2, 7)]
    return [rows[i] for i in range(12) for rows in by_digits]


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, task_rows) -> Path:
    """64 unpacked training rows and 16 eval rows: enough for a few fast steps."""
    train, held, _ = task_rows
    return write_cache(tmp_path_factory.mktemp("cache") / "small", train[:64], held[:16])


@pytest.fixture(scope="session")
def packed_cache(tmp_path_factory, task_rows) -> Path:
    train, held, _ = task_rows
    return write_cache(
        tmp_path_factory.mktemp("cache") / "packed", pack(train[:64], 64), pack(held[:16], 64), packed=True
    )

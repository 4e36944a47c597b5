"""The tokenizer of a config (one loader for both stages, so they tokenise alike) and its
content digest for the cache fingerprint: the serialised backend (vocabulary, merges, added
tokens, normaliser, pre-tokeniser, post-processor), the special tokens and the chat template, as
loaded — so a changed file, revision, `special_tokens` or `tokens` entry changes the digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from schemas.config import TrainingConfig
from schemas.paths import is_local, local_path
from worker.errors import ModelError


def pretrained_source(name: str, cfg: TrainingConfig) -> dict[str, Any]:
    """A local folder, or a Hub id at revision_of_model (the token comes from HF_TOKEN): where the
    tokenizer, and the model (worker/train/model.py), load from."""
    if is_local(name):
        return {"pretrained_model_name_or_path": str(local_path(name))}
    return {"pretrained_model_name_or_path": name, "revision": cfg.revision_of_model}


def load_tokenizer(cfg: TrainingConfig) -> Any:
    """The config's tokenizer with its special tokens, added tokens, pad token and padding side."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            **pretrained_source(cfg.tokenizer_config or cfg.base_model, cfg),
            use_fast=cfg.tokenizer_use_fast,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load the tokenizer of {cfg.tokenizer_config or cfg.base_model!r}: {e}",
            hint="check base_model / tokenizer_config and revision_of_model",
        ) from e
    if cfg.special_tokens is not None:
        special = {k: v for k, v in cfg.special_tokens.model_dump().items() if v is not None}
        tok.add_special_tokens(special)
    if cfg.tokens:
        tok.add_tokens(list(cfg.tokens))
    if tok.pad_token is None:  # batches are padded; the pad id is never trained (labels -100)
        tok.pad_token = tok.eos_token
    if cfg.tokenizer_padding_side:
        tok.padding_side = cfg.tokenizer_padding_side
    return tok


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

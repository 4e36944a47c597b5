"""Small data writers shared by the pipeline tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from schemas.config import TrainingConfig

WORDS = ["hello", "world", "answer", "yes", "no", "sort", "copy", "upper", "reverse", "count"]


def alpaca_rows(n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "instruction": f"task {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
            "input": "",
            "output": " ".join(rng.choices(WORDS, k=rng.randint(1, max_words))),
        }
        for i in range(n)
    ]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 20)))})
        rows.append({"messages": messages})
    return rows


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_row(arguments, content: str = "") -> dict:
    """A tool-calling conversation: the assistant calls get_weather, the tool answers, the assistant replies."""
    return {
        "tools": [TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": content,
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tokenizer_dir: Path, datasets: list[dict], **keys) -> TrainingConfig:
    keys.setdefault("sequence_len", 128)
    return TrainingConfig(base_model=str(tokenizer_dir), learning_rate=1e-4, datasets=datasets, **keys)

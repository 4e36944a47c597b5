"""transformers + peft generation: the fallback engine where vLLM is not installed.

One base model; LoRA adapters loaded into one PeftModel under their request names, switched per
request (`disable_adapter()` for the base). Requests run one at a time on a worker thread: this
engine trades throughput for having no dependency beyond transformers and peft (bench/serve.py
measures what that costs against vLLM). Sampling follows vLLM's meaning of each setting, so the
two engines answer the same request the same way (greedy output is equal token for token).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from worker.errors import AdapterError, ServeError


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_request(cls, body: dict[str, Any]) -> SamplingSettings:
        for key in ("presence_penalty", "frequency_penalty"):
            if body.get(key):
                raise ServeError(
                    f"{key} is not supported by the transformers engine",
                    hint="use repetition_penalty, or serve with vLLM",
                )
        stop = body.get("stop") or ()
        return cls(
            max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
            temperature=1.0 if body.get("temperature") is None else float(body["temperature"]),
            top_p=1.0 if body.get("top_p") is None else float(body["top_p"]),
            top_k=-1 if body.get("top_k") is None else int(body["top_k"]),
            min_p=float(body.get("min_p") or 0.0),
            repetition_penalty=float(body.get("repetition_penalty") or 1.0),
            seed=body.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str


class _TokenSink(BaseStreamer):
    """Forwards each new token id to a callback (the first put() is the prompt: skipped)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


class HFEngine:
    def __init__(self, model: str, dtype: str | None = None, max_model_len: int | None = None):
        torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else "auto"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
        self.base = self.model
        self.max_model_len = max_model_len or getattr(self.model.config, "max_position_embeddings", 2048)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()  # one generate (or adapter change) at a time

    # ---- adapters
    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self.lock:
            if name in self.adapters:
                return
            try:
                if self.model is self.base:
                    self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
                else:
                    self.model.load_adapter(path, adapter_name=name)
            except Exception as e:  # peft raises many types for a bad adapter folder
                raise AdapterError(f"adapter {name!r} could not be loaded: {type(e).__name__}: {e}") from e
            self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise ServeError(f"adapter {name!r} is not loaded", status=404)
            self.model.delete_adapter(name)
            del self.adapters[name]

    # ---- prompts
    def chat_prompt(self, messages: list[dict[str, Any]], chat_template: str | None = None) -> list[int]:
        plain = [{"role": m["role"], "content": _text(m["content"])} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                plain, chat_template=chat_template, add_generation_prompt=True, tokenize=True
            )
        except Exception as e:  # a template that raises (e.g. roles must alternate) is the request's problem
            raise ServeError(f"the chat template rejected these messages: {e}") from e
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        room = self.max_model_len - prompt_len
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = f" + max_tokens {max_tokens}" if max_tokens is not None else ""
            raise ServeError(
                f"this request needs {prompt_len} prompt tokens{asked}, more than the model's "
                f"{self.max_model_len}-token context",
                hint="shorten the messages or lower max_tokens",
            )
        return max_tokens if max_tokens is not None else room

    # ---- generation
    def generate(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        sampling: SamplingSettings,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        max_new = self.check_length(len(prompt_ids), sampling.max_tokens)
        kwargs = self._generate_kwargs(sampling, max_new)
        with self.lock:
            if adapter is not None and adapter not in self.adapters:
                raise ServeError(f"adapter {adapter!r} is not loaded", status=404)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            streamer = _TokenSink(on_token) if on_token else None
            with torch.inference_mode(), self._adapter(adapter):
                out = self.model.generate(
                    torch.tensor([prompt_ids]),
                    attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                    streamer=streamer,
                    **kwargs,
                )
        new = out[0, len(prompt_ids) :].tolist()
        # vLLM's (and OpenAI's) rule: the EOS was generated, so it is one of the completion's tokens
        ended = bool(new) and new[-1] in self.eos_ids
        finish = "stop" if ended else "length"
        text = self.tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True)
        for s in sampling.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Generation(new, text, finish)

    def _adapter(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter() if self.model is not self.base else contextlib.nullcontext()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _generate_kwargs(self, s: SamplingSettings, max_new: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "min_new_tokens": 0,
            "eos_token_id": sorted(self.eos_ids) or None,
            "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": s.repetition_penalty,
        }
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        if s.temperature == 0:
            return {**kwargs, "do_sample": False, "top_k": None, "top_p": None, "temperature": None}
        return {
            **kwargs,
            "do_sample": True,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k if s.top_k > 0 else 0,
            "min_p": s.min_p or None,
        }


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

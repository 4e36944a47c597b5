"""Requests the serving worker accepts, validated before any engine work (import-light: pydantic only).

Shapes (`parse_request` tells them apart and returns one typed request):
- OpenAI: `ChatCompletionRequest` (/v1/chat/completions), `CompletionRequest` (/v1/completions),
  `/v1/models`. The `model` field names the base model or an adapter (Hub `org/repo[@revision]`,
  `s3://bucket/prefix`, a run id in the configured bucket, or a preloaded name).
- RunPod's OpenAI-compatible route: `{"openai_route": "/v1/...", "openai_input": {...}}`.
- The batch shape: `{"messages": [[message, ...], ...], "n", "temperature", "top_p", "max_tokens",
  "generation_kwargs": {...}, "model"?}` — one chat completion per conversation.
Unknown fields are errors (a typo must not silently change sampling); every problem is reported
at once as `{loc, msg}` issues.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from schemas.base import Frozen
from schemas.issues import Issue, pydantic_issues

MAX_BATCH_CONVERSATIONS = 256
MAX_TOKENS = 2**31 - 1  # above any context; a 4,000-digit max_tokens was quoted whole in the context error
MAX_SEED = 2**63 - 1  # what torch and vLLM take (a larger one was the engine's "Overflow when unpacking long long")
MAX_STOP_CHARS = (
    256  # transformers' stop-string tables cost time in length x vocabulary: 1 MB held the engine for minutes
)
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class Strict(Frozen):
    """A request's part: the input models' base, with room for a 64-bit seed."""

    largest_number: ClassVar[int] = MAX_SEED + 1


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationKwargs(Strict):
    """Sampling settings beyond the OpenAI basics that both engines implement."""

    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)

    @model_validator(mode="after")
    def _stop_list(self) -> GenerationKwargs:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        if any(len(s) > MAX_STOP_CHARS for s in ([self.stop] if isinstance(self.stop, str) else self.stop or ())):
            raise ValueError(f"a stop sequence takes at most {MAX_STOP_CHARS} characters")
        return self


def check_greedy_n(n: int, temperature: float | None) -> None:
    if n > 1 and temperature == 0:
        raise ValueError(f"n={n} needs temperature > 0: greedy decoding (temperature 0) gives one answer, not {n}")


class Sampling(GenerationKwargs):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM's extension: the generated token ids in each choice

    @model_validator(mode="after")
    def _one_length_limit(self) -> Sampling:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        check_greedy_n(self.n, self.temperature)
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(Sampling):
    model: str = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1)


Conversation = Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionRequest(Sampling):
    model: str = Field(min_length=1, max_length=512)
    prompt: (
        str | Annotated[list[str], Field(max_length=MAX_BATCH_CONVERSATIONS)]
    )  # each one a completion: as many as a batch

    @field_validator("prompt")
    @classmethod
    def _prompt_present(cls, v: str | list[str]) -> str | list[str]:
        if not v or (isinstance(v, list) and not all(v)):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ModelsRequest(Strict):
    pass


class BatchRequest(Strict):
    """Many conversations in one job: each gets `n` chat completions with the same settings."""

    messages: list[Conversation] = Field(min_length=1, max_length=MAX_BATCH_CONVERSATIONS)
    model: str | None = Field(default=None, min_length=1, max_length=512)
    n: int = Field(default=1, ge=1, le=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    generation_kwargs: GenerationKwargs = GenerationKwargs()

    @model_validator(mode="after")
    def _greedy_n(self) -> BatchRequest:
        check_greedy_n(self.n, self.temperature)
        return self

    def chat_request(self, model: str, conversation: list[ChatMessage]) -> ChatCompletionRequest:
        extra = self.generation_kwargs.model_dump(exclude_none=True)
        return ChatCompletionRequest(
            model=model,
            messages=conversation,
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            **extra,
        )


ServeRequest = ChatCompletionRequest | CompletionRequest | ModelsRequest | BatchRequest
ROUTE_MODELS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest] | type[ModelsRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/models": ModelsRequest,
}


class RequestInvalid(ValueError):
    """Every problem of a request, as issues with locations."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))


def parse_route(route: str, body: Any) -> ServeRequest:
    """Validate the body of one OpenAI route (also used by `ftw serve`'s HTTP routes)."""
    if route not in ROUTE_MODELS:
        raise RequestInvalid([Issue("openai_route", f"unknown route {route!r}: use one of {', '.join(OPENAI_ROUTES)}")])
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise RequestInvalid([Issue("", f"the request body must be a JSON object, got {type(body).__name__}")])
    try:
        return ROUTE_MODELS[route].model_validate(dict(body))
    except ValidationError as e:
        raise RequestInvalid(pydantic_issues(e)) from e


def parse_request(raw: Any) -> tuple[str | None, ServeRequest]:
    """A RunPod job input → (OpenAI route or None for the batch shape, typed request)."""
    if isinstance(raw, Mapping) and "input" in raw and len(raw) == 1:
        raw = raw["input"]
    if not isinstance(raw, Mapping):
        raise RequestInvalid([Issue("input", f"the job input must be a JSON object, got {type(raw).__name__}")])
    if "openai_route" in raw:
        extra = sorted(set(raw) - {"openai_route", "openai_input"})
        if extra:
            raise RequestInvalid(
                [Issue(k, "unknown field next to openai_route (only openai_input goes there)") for k in extra]
            )
        route = raw["openai_route"]
        if not isinstance(route, str):
            raise RequestInvalid([Issue("openai_route", "must be a string such as /v1/chat/completions")])
        return route, parse_route(route, raw.get("openai_input"))
    if "messages" not in raw:
        raise RequestInvalid(
            [Issue("input", "give either openai_route + openai_input (OpenAI shape) or messages (batch shape)")]
        )
    return None, parse_batch(raw)


def parse_batch(body: Any) -> BatchRequest:
    if not isinstance(body, Mapping):
        raise RequestInvalid([Issue("", f"the request body must be a JSON object, got {type(body).__name__}")])
    try:
        return BatchRequest.model_validate(dict(body))
    except ValidationError as e:
        raise RequestInvalid(pydantic_issues(e)) from e

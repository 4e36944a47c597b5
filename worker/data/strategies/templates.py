"""Chat templates by name (a closed registry), and which template a dataset entry uses.

Order: the dataset's chat_template_jinja, the dataset's chat_template, the config's
chat_template_jinja, the config's chat_template, else the tokenizer's own (tokenizer_default).
`tokenizer_default_fallback_<name>` uses the tokenizer's template when it has one, else <name>.
"""

from __future__ import annotations

from typing import Any

from worker.errors import JobSpecError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
PHI_3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n<|assistant|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif "
    "%}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif "
    "%}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "phi_3": PHI_3, "gemma": GEMMA}
FALLBACK_PREFIX = "tokenizer_default_fallback_"


def named_template(name: str) -> str:
    if name not in NAMED_TEMPLATES:
        known = ", ".join([*NAMED_TEMPLATES, "tokenizer_default", FALLBACK_PREFIX + "<name>", "jinja"])
        raise JobSpecError(
            f"unknown chat_template {name!r}",
            hint=f"use one of: {known}, or give the template text in chat_template_jinja",
        )
    return NAMED_TEMPLATES[name]


def resolve_template(name: str | None, jinja: str | None, tokenizer: Any) -> str:
    """The template text for `chat_template: name` / `chat_template_jinja: text` on this tokenizer."""
    if jinja:
        return jinja
    if name == "jinja":
        raise JobSpecError("chat_template: jinja needs chat_template_jinja (the template text)")
    own = getattr(tokenizer, "chat_template", None)
    if name is None or name == "tokenizer_default":
        if not own:
            raise JobSpecError(
                "the tokenizer has no chat template",
                hint=f"set chat_template to one of {', '.join(NAMED_TEMPLATES)} or give chat_template_jinja",
            )
        return own if isinstance(own, str) else own.get("default", next(iter(own.values())))
    if name.startswith(FALLBACK_PREFIX):
        return own if isinstance(own, str) and own else named_template(name.removeprefix(FALLBACK_PREFIX))
    return named_template(name)


def template_for(dataset: Any, config: Any, tokenizer: Any) -> str:
    if dataset is not None and (dataset.chat_template_jinja or dataset.chat_template):
        return resolve_template(dataset.chat_template, dataset.chat_template_jinja, tokenizer)
    return resolve_template(config.chat_template, config.chat_template_jinja, tokenizer)

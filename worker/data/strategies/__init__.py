"""Prompt strategies by name: a closed registry (no dotted module paths from a job, ever).

    build_strategy(Context(dataset_entry, config, tokenizer, source_name)) -> Strategy

Names follow axolotl: alpaca, alpaca:chat, alpaca:chatml, alpaca:phi, chat_template
(chat_template.default), completion, input_output, the dict form (user-defined instruction
format), and pretraining (entries of pretraining_dataset).
"""

from __future__ import annotations

from schemas.datasets import UserDefinedFormat
from worker.data.strategies.base import IGNORE, Context, Sample, Strategy
from worker.data.strategies.chat import ChatTemplateStrategy
from worker.data.strategies.instruct import alpaca, user_defined
from worker.data.strategies.text import CompletionStrategy, InputOutputStrategy
from worker.errors import JobSpecError

BUILDERS = {
    "alpaca": lambda ctx: alpaca(ctx, "instruct"),
    "alpaca:chat": lambda ctx: alpaca(ctx, "chat"),
    "alpaca:chatml": lambda ctx: alpaca(ctx, "chatml"),
    "alpaca:phi": lambda ctx: alpaca(ctx, "phi"),
    "chat_template": ChatTemplateStrategy,
    "chat_template.default": ChatTemplateStrategy,
    "completion": lambda ctx: CompletionStrategy(ctx, ctx.dataset.field or "text"),
    "pretraining": lambda ctx: CompletionStrategy(ctx, ctx.dataset.text_column or "text"),
    "input_output": InputOutputStrategy,
}


def build_strategy(ctx: Context) -> Strategy:
    kind = ctx.dataset.type
    if isinstance(kind, UserDefinedFormat):
        return user_defined(ctx, kind)
    if kind is None:
        kind = "chat_template" if ctx.dataset.strategy_name() == "chat_template" else "alpaca"
    if kind not in BUILDERS:
        raise JobSpecError(
            f"prompt strategy {kind!r} is not available", hint=f"use one of: {', '.join(BUILDERS)}, or the dict form"
        )
    return BUILDERS[kind](ctx)


__all__ = ["IGNORE", "Context", "Sample", "Strategy", "build_strategy"]

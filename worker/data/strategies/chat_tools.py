"""Tool calls and tool definitions of `chat_template` rows (worker/data/strategies/chat.py), as the template takes
them: `function.arguments` / `function.parameters` given as JSON strings (common in exported datasets) decoded,
and the nulls the datasets library leaves inside them when it merges schemas across rows dropped, as axolotl
does. A value that is not the shape a template expects is a DataError naming the row and the field."""

from __future__ import annotations

import json
from typing import Any

from worker.data.strategies.base import Context


def tool_calls(ctx: Context, calls: Any, index: int, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, their arguments decoded."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ctx.row_error(index, where, "expected a list of tool call objects ({type, function: {name, arguments}})")
    return _decoded(ctx, calls, "arguments", index, where)


def tool_definitions(ctx: Context, tools: Any, index: int, where: str) -> list[dict[str, Any]] | None:
    """The row's `tools` (a list, or a JSON string of one), their parameters decoded; None when the row has none."""
    tools = without_nulls(tools)
    if isinstance(tools, str):
        tools = _json_value(ctx, tools, index, where)
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ctx.row_error(
            index,
            where,
            "expected a list of tool definitions ({type: function, function: {name, description, parameters}})",
        )
    return _decoded(ctx, tools, "parameters", index, where)


def _decoded(ctx: Context, items: list[dict[str, Any]], key: str, index: int, where: str) -> list[dict[str, Any]]:
    """Each item's `function.<key>`, when given as a JSON string, decoded."""
    out = []
    for n, item in enumerate(items):
        function = item.get("function")
        if isinstance(function, dict) and isinstance(function.get(key), str):
            value = _json_value(ctx, function[key], index, f"{where}[{n}].function.{key}")
            item = {**item, "function": {**function, key: value}}
        out.append(item)
    return out


def _json_value(ctx: Context, text: str, index: int, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ctx.row_error(
            index, where, f"not valid JSON: {e}", hint="give it as a JSON object, or a string holding valid JSON"
        ) from e


def without_nulls(value: Any) -> Any:
    """Nested nulls dropped: the datasets library fills keys a row lacks with null when it merges schemas."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value

"""The limits on what a caller may send, in one place, and the parsers that enforce them.

A job or config arrives as text (a file for `ftw validate/run/submit`, a request body at the local
endpoint). Before anything walks it, it must be small, shallow and free of alias bombs, because
every later step (validation, redaction, writing config.json) walks it: a value nested 100,000 deep
overflows recursive code, a YAML alias chain expands to billions of nodes, a 50 MB string makes a
50 MB error line. Each limit is far above what a real axolotl config uses (a few KB, 4-5 levels).
The caps on keys per mapping and items per list bound the work of validation itself (each key
is classified, each dataset entry checked). Everything here is linear in the size of the input.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

MAX_DOCUMENT_BYTES = 10 * 1024 * 1024  # a job file or /run body; put data in S3/Hub and name it
MAX_DEPTH = 32  # lists/mappings inside each other; axolotl configs use 4-5
MAX_KEYS = 1_000  # keys in one mapping; axolotl knows about 400 config keys in all
MAX_ITEMS = 10_000  # items in one list (datasets, target modules, special tokens)
MAX_NODES = 1_000_000  # values in a document once YAML aliases are expanded
EXCERPT_CHARS = 80  # the most of an offending value an error message quotes

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = EXCERPT_CHARS
_SHORT_REPR.maxlevel = 3


class DocumentError(ValueError):
    """The text is not a document ftw reads: one line that says why and what to change."""


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """The repr of a value as an error message may quote it: at most about `limit` characters, and
    the length of what was cut, so a 50 MB value makes a short line (the whole repr is never built)."""
    if isinstance(value, str):
        from schemas.secrets import SHAPES  # a URL's password or signature is masked before the cut

        if len(value) > limit:
            return f"{SHAPES.text(value[: limit + 256])[:limit]!r}... ({len(value):,} characters)"
        return repr(SHAPES.text(value))
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length():,} bits>"
    return _SHORT_REPR.repr(value)


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was: for messages that may quote a value."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def shape_problem(value: Any) -> str | None:
    """What makes `value` too deep or too wide to validate (None when it is within the limits);
    checked without recursion, and each value visited once, so the check itself is linear."""
    containers = (list, tuple, dict)
    stack = [(value, 0)] if isinstance(value, containers) else []
    nodes = 0
    while stack:
        item, depth = stack.pop()
        if depth >= MAX_DEPTH:
            return f"nests lists/mappings more than {MAX_DEPTH} levels deep"
        if isinstance(item, dict) and len(item) > MAX_KEYS:
            return f"has a mapping of {len(item):,} keys (at most {MAX_KEYS:,})"
        if not isinstance(item, dict) and len(item) > MAX_ITEMS:
            return f"has a list of {len(item):,} items (at most {MAX_ITEMS:,})"
        nodes += len(item)
        if nodes > MAX_NODES:
            return f"holds more than {MAX_NODES:,} values"
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, containers):
                stack.append((child, depth + 1))
    return None


def parse_json(
    data: bytes | str, what: str = "the document", max_bytes: int = MAX_DOCUMENT_BYTES, strict: bool = True
) -> Any:
    """A JSON document within the limits: no NaN/Infinity (not JSON), no key twice in one object,
    no lone UTF-16 surrogate (it cannot be written back as UTF-8), a UTF-8 BOM tolerated.
    `strict=False` (what ftw's own processes post, such as a worker's result with its long progress
    list or a NaN loss) keeps only the size and the parser's own depth guard."""
    data = _text(data, what, max_bytes)
    if not strict:
        try:
            return json.loads(data)
        except RecursionError:
            raise DocumentError(f"{what} nests lists/objects far too deep") from None
        except ValueError as e:
            raise DocumentError(f"{what} is not valid JSON: {_one_line(str(e))}") from None
    try:
        value = json.loads(data, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise DocumentError(f"{what} nests lists/objects far more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as e:
        raise DocumentError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # NaN, a duplicate key, an integer of more than 4300 digits
        raise DocumentError(f"{what} is not accepted: {e}") from None
    _check_tree(value, what)
    return value


def parse_yaml(data: bytes | str, what: str = "the document") -> Any:
    """A YAML document within the limits. libyaml's event parser runs first (it is iterative, so
    depth cannot crash it); only a document that passes is composed into Python values."""
    import yaml

    text = _text(data, what, MAX_DOCUMENT_BYTES)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_events(yaml.parse(text, Loader=loader), what)
        value = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise DocumentError(f"{what} is not valid YAML: {_one_line(str(e))}") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise DocumentError(f"{what} is not accepted: {_one_line(str(e))}") from None
    _check_tree(value, what)
    return value


def _text(data: bytes | str, what: str, max_bytes: int) -> str:
    """The document as text, after the size check; a UTF-8 byte order mark is dropped."""
    if len(data) > max_bytes:
        raise DocumentError(
            f"{what} is {len(data):,} bytes, over the {max_bytes / (1024 * 1024):g} MB limit; "
            "put large data (datasets, templates) in a file on S3 or the Hub and name it"
        )
    if isinstance(data, str):
        return data.removeprefix("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"{what} is not valid JSON or YAML: it is not UTF-8 text (byte {e.start} is "
            f"{data[e.start : e.start + 1]!r})"
        ) from None


def _check_events(events: Any, what: str) -> None:
    """Depth, expanded size (a YAML alias counts as the whole value it names) and duplicate keys."""
    import yaml

    sizes: dict[str, int] = {}  # anchor -> expanded node count of the value it names
    stack: list[
        tuple[str | None, int, set[str] | None, list[Any]]
    ] = []  # (anchor, nodes at start, keys seen, [at key, items])
    nodes = 0

    def value_done(count: int, key: str | None) -> None:
        if not stack:
            return
        if stack[-1][2] is None:
            stack[-1][3][1] += 1
            if stack[-1][3][1] > MAX_ITEMS:
                raise DocumentError(f"{what} has a list of more than {MAX_ITEMS:,} items")
            return
        keys, state = stack[-1][2], stack[-1][3]
        if state[0] and key is not None and key != "<<":
            if key in keys:
                raise DocumentError(f"{what} has the key {excerpt(key)} twice in one mapping; keep one")
            keys.add(key)
            if len(keys) > MAX_KEYS:
                raise DocumentError(f"{what} has a mapping of more than {MAX_KEYS:,} keys")
        state[0] = not state[0]

    for event in events:
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise DocumentError(f"{what} nests lists/mappings more than {MAX_DEPTH} levels deep")
            mapping = isinstance(event, yaml.MappingStartEvent)
            stack.append((event.anchor, nodes, set() if mapping else None, [True, 0]))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, start, _, _ = stack.pop()
            nodes += 1
            if anchor:
                sizes[anchor] = nodes - start
            value_done(nodes - start, None)
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor:
                sizes[event.anchor] = 1
            value_done(1, event.value)
        elif isinstance(event, yaml.AliasEvent):
            nodes += sizes.get(event.anchor, 1) if event.anchor else 1
            value_done(0, None)
        if nodes > MAX_NODES:
            raise DocumentError(
                f"{what} expands to more than {MAX_NODES:,} values (YAML aliases repeat what they "
                "name); write the values out or use fewer aliases"
            )


def _check_tree(value: Any, what: str) -> None:
    problem = shape_problem(value)
    if problem:
        raise DocumentError(f"{what} {problem}")
    try:  # C speed; fails on the first lone surrogate ("\ud800" in JSON), which no file or log can hold
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise DocumentError(
            f"{what} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); send text as valid Unicode"
        ) from None
    except (ValueError, TypeError, RecursionError):  # not JSON-shaped (YAML dates, sets): the validators say more
        pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; use a finite number or null")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {excerpt(key)} appears twice in one object; keep one")
        out[key] = value
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]

"""The one shape of a validation problem, shared by `ftw validate`, the handler and the endpoint.

Validation never stops at the first problem: every stage appends to a list of `Issue`s and the
caller gets all of them with their locations (`datasets[0].type`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.limits import EXCERPT_CHARS, clip, excerpt

# Why an error blocks the job: the value is wrong ("invalid"), the feature is a real axolotl
# feature ftw does not implement ("unsupported"), or the endpoint operator has to allow it
# ("gated"). Not part of the JSON shape users script against; tests and the compat table use it.
IssueKind = Literal["invalid", "unsupported", "gated"]
MAX_MESSAGE = 2000
MAX_ISSUES = 100


@dataclass(frozen=True)
class Issue:
    loc: str
    msg: str
    kind: IssueKind = "invalid"

    def __post_init__(self) -> None:
        """A location built from a pasted blob used as a key, or a message that quotes one, stays a line."""
        object.__setattr__(self, "loc", clip(self.loc, 4 * EXCERPT_CHARS))
        object.__setattr__(self, "msg", clip(self.msg, MAX_MESSAGE))

    def as_dict(self) -> dict[str, str]:
        return {"loc": self.loc, "msg": self.msg}

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg


def format_loc(parts: tuple[Any, ...] | list[Any], prefix: str = "") -> str:
    """(datasets, 0, type) -> 'datasets[0].type' — the form users see in their YAML."""
    out = prefix
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and len(p) > EXCERPT_CHARS:  # a pasted blob used as a key
            out += f"[{excerpt(p)}]"
        elif p == "":
            out += '[""]'
        else:
            out += f".{p}" if out else str(p)
    return out


@dataclass
class Report:
    """Outcome of validating a config or a job: valid iff no errors; warnings never block."""

    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    value: Any = None

    @property
    def valid(self) -> bool:
        return not self.errors

    def error(self, loc: str, msg: str, kind: IssueKind = "invalid") -> None:
        self.errors.append(Issue(loc, msg, kind))

    def warn(self, loc: str, msg: str) -> None:
        self.warnings.append(Issue(loc, msg))

    def extend(self, other: Report, prefix: str = "") -> None:
        def shift(i: Issue) -> Issue:
            if not prefix:
                return i
            if not i.loc:
                return Issue(prefix, i.msg, i.kind)
            sep = "" if i.loc.startswith("[") else "."
            return Issue(f"{prefix}{sep}{i.loc}", i.msg, i.kind)

        self.errors += [shift(i) for i in other.errors]
        self.warnings += [shift(i) for i in other.warnings]

    def capped(self, limit: int = MAX_ISSUES) -> Report:
        """At most `limit` errors and warnings each, the last one saying how many more there were:
        a list of 10,000 bad entries makes a readable answer, not 10,000 lines."""
        for name in ("errors", "warnings"):
            issues = getattr(self, name)
            if len(issues) > limit:
                more = len(issues) - limit + 1
                setattr(
                    self,
                    name,
                    issues[: limit - 1] + [Issue("", f"... and {more:,} more {name} like these", issues[-1].kind)],
                )
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "errors": [i.as_dict() for i in self.errors],
            "warnings": [i.as_dict() for i in self.warnings],
        }


def pydantic_issues(exc: Any, prefix: str = "", skip: Collection[str] = ()) -> list[Issue]:
    """Turn a pydantic ValidationError into Issues with YAML-style locations; errors under a
    top-level key in `skip` are left to the caller (credentials: their values must never be echoed)."""
    issues = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        if loc and loc[0] in skip:
            continue
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {excerpt(err['input'])})"
        msg = msg.removeprefix("Value error, ")
        issues.append(Issue(format_loc(loc, prefix), msg))
    return issues

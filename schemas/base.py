"""The base of every input model: immutable, unknown keys refused, and numbers that are numbers.

JSON's and YAML's `true` is a Python bool, and a bool is an int, so pydantic's lax mode reads
`max_steps: true` as one step. A field typed as a number refuses a boolean here, and a number must
lie within ±2**53 (what a float holds exactly; no training setting comes near it), so `seed: 2**70`
is refused at validation instead of failing in the trainer. Ranges of their own stay on the fields.
A model whose numbers are integers beyond that (the serving requests' 64-bit seed) raises
`largest_number`.
"""

# No `from __future__ import annotations`: see schemas/config.py.
import functools
import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from schemas.limits import excerpt

MAX_NUMBER = 2**53


class Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, protected_namespaces=(), allow_inf_nan=False
    )
    largest_number: ClassVar[int] = MAX_NUMBER

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name not in number_fields(cls):
            return value
        if isinstance(value, bool):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        if isinstance(value, (int, float)) and abs(value) > cls.largest_number:
            raise ValueError(
                f"{excerpt(value)} is out of range: a number here is at most {cls.largest_number:,} in size"
            )
        return value


@functools.cache
def number_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields that take an int or a float and never a boolean."""
    return frozenset(
        name
        for name, f in model.model_fields.items()
        if _types(f.annotation) & {int, float} and bool not in _types(f.annotation)
    )


def _types(annotation: Any) -> set[Any]:
    """The plain types a field annotation admits (through Optional/Union; Literal values by their type)."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:  # Optional[int] and int | None
        return set().union(*(_types(a) for a in get_args(annotation)))
    if origin is Literal:
        return {type(a) for a in get_args(annotation)}
    return {annotation}

"""The optimizer registry (schemas/optimizers.py) as validation reads it: every name ftw builds
validates, every name it knows but does not build is refused as unsupported, naming what is built."""

from __future__ import annotations

import pytest

from schemas.optimizers import NOT_SHIPPED, OPTIMIZERS
from schemas.validate import validate_config

ENV = {"BASE_VOLUME": "/volume"}
GOOD = {"base_model": "org/model", "learning_rate": 2e-4, "datasets": [{"path": "org/data", "type": "alpaca"}]}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_validates(name: str) -> None:
    report = validate_config({**GOOD, "optimizer": name}, ENV)
    assert report.valid and report.value.optimizer == name, report.errors


def test_a_name_is_either_built_or_known_not_to_be() -> None:
    assert not NOT_SHIPPED & OPTIMIZERS.keys()
    assert {"adamw_torch_4bit", "adamw_torch_8bit", "ao_adamw_fp8"} <= OPTIMIZERS.keys()  # torchao's, shipped


@pytest.mark.parametrize("name", sorted(NOT_SHIPPED))
def test_an_optimizer_ftw_does_not_build_is_unsupported_naming_every_one_it_does(name: str) -> None:
    (issue,) = validate_config({**GOOD, "optimizer": name}, ENV).errors
    assert (issue.loc, issue.kind) == ("optimizer", "unsupported")
    assert issue.msg == f"optimizer {name!r} is not supported by ftw; use one of {', '.join(OPTIMIZERS)}"


def test_a_typo_is_invalid_not_unsupported() -> None:
    (issue,) = validate_config({**GOOD, "optimizer": "adamw_torch_fusd"}, ENV).errors
    assert (issue.loc, issue.kind) == ("optimizer", "invalid") and "is not known; use one of adamw_torch," in issue.msg

"""A valid training config and shorthands for what validating a variant of it reports, for the config rule tests."""

from __future__ import annotations

from schemas.validate import validate_config

ENV = {"BASE_VOLUME": "/volume"}
GOOD = {"base_model": "org/model", "learning_rate": 2e-4, "datasets": [{"path": "org/data", "type": "alpaca"}]}


def errors(raw, env=ENV):
    return {(i.loc, i.kind): i.msg for i in validate_config(raw, env).errors}


def locs(raw, env=ENV):
    return {i.loc for i in validate_config(raw, env).errors}

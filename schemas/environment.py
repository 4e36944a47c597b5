"""What the endpoint operator sets through environment variables (see docs/config.md).

- FTW_CONFIG_DEFAULTS: JSON object of config keys used when a job does not set them.
- FTW_CONFIG_OVERRIDES: JSON object of config keys the operator fixes; a job's own value for
  such a key is not used (a warning says so). Top-level keys are replaced whole.
- FTW_ALLOW_PLUGINS, FTW_ALLOW_REMOTE_CODE: allow the gated keys of schemas/keys.py.
- BASE_VOLUME, FTW_ALLOWED_PATHS: where local paths may point (schemas/paths.py).

Both layers go through the same validation as the job's own keys; an error about a key that
came from a layer says so, because only the operator can fix it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.issues import Issue, Report

DEFAULTS_VAR = "FTW_CONFIG_DEFAULTS"
OVERRIDES_VAR = "FTW_CONFIG_OVERRIDES"
TRUTHY = ("1", "true", "yes", "on")


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return (env.get(name) or "").strip().lower() in TRUTHY


@dataclass(frozen=True)
class OperatorLayers:
    defaults: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def apply(self, job: Mapping[str, Any], report: Report) -> dict[str, Any]:
        """A new dict: defaults under the job's keys, overrides over them (warning where they differ)."""
        for key, value in self.overrides.items():
            if key in job and job[key] != value:
                report.warn(
                    key, f"the endpoint operator fixes {key} (FTW_CONFIG_OVERRIDES); the job's value is not used"
                )
        return {**self.defaults, **job, **self.overrides}

    def source_of(self, key: str, job: Mapping[str, Any]) -> str | None:
        """The variable a top-level key's value came from, or None when it came from the job."""
        if key in self.overrides:
            return OVERRIDES_VAR
        if key in self.defaults and key not in job:
            return DEFAULTS_VAR
        return None

    def blame(self, issue: Issue, job: Mapping[str, Any]) -> Issue:
        """Say so in an error whose key came from the operator: the user cannot fix it."""
        top = issue.loc.split(".")[0].split("[")[0]
        source = self.source_of(top, job)
        if source is None:
            return issue
        return Issue(
            issue.loc,
            f"{issue.msg} [this value comes from the endpoint's {source}: the operator must fix it]",
            issue.kind,
        )


def operator_layers(env: Mapping[str, str], report: Report) -> OperatorLayers:
    """Read both JSON objects; a malformed one is an error (reported, never half-applied)."""
    layers = []
    for name in (DEFAULTS_VAR, OVERRIDES_VAR):
        text = env.get(name) or ""
        try:
            value = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            report.error(
                name, f"environment variable {name} is not valid JSON ({e.msg}); the endpoint operator must fix it"
            )
            value = {}
        if not isinstance(value, dict):
            report.error(
                name,
                f"environment variable {name} must be a JSON object of config keys; the endpoint operator must fix it",
            )
            value = {}
        layers.append(value)
    return OperatorLayers(*layers)

"""The job input a user sends to the training endpoint (RunPod `input`), and its validation.

Accepted shapes: `{"input": {...}}` or the bare input; `config` or its alias `args` (the axolotl
worker's name). Keys that axolotl's RunPod worker payloads carry and its handler never reads
(`name`, and `timeout`, the RunPod Hub test runner's wait in ms) are accepted and ignored
(`user_id` and `model_id` are kept in job.json); any other unknown top-level key is ignored with a warning and a closest
match, as unknown config keys are. Inside `outputs`, `limits` and `credentials` an unknown key is
still an error: a typo there would publish to the wrong place or drop a limit. Credentials are
SecretStr: never printed, never dumped (`JobInput.public_dict` drops them).
"""

# No `from __future__ import annotations` here: pydantic builds models from real types faster than
# from strings, and these models are built on every `ftw validate` start.
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator

from schemas.base import Frozen
from schemas.classify import did_you_mean, warn_unknown
from schemas.config import TrainingConfig
from schemas.issues import Issue, Report, pydantic_issues
from schemas.limits import excerpt, shape_problem
from schemas.secrets import Redactor
from schemas.validate import validate_config

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PublishKind = Literal["adapter", "checkpoints", "merged"]
SECRET_KEYS = ("credentials",)
MIN_MASKED_LEN = 6  # shorter strings are too common in messages to mask, and too short to be a credential


BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
S3_ENDPOINT_URL = re.compile(r"^https?://")


def bucket_name_problem(name: str) -> str | None:
    """Why `name` cannot be an S3 bucket's name, or None: the one rule for outputs.s3.bucket and s3Config.bucketName."""
    if BUCKET_NAME.fullmatch(name):
        return None
    return (
        f"{excerpt(name)} is not a bucket name: use 3-63 lowercase letters, digits, '.' or '-', "
        "starting and ending with a letter or digit"
    )


def endpoint_url_problem(url: str) -> str | None:
    """Why `url` cannot be an S3 endpoint, or None: one rule for outputs.s3.endpoint_url and s3Config.endpointUrl."""
    return None if S3_ENDPOINT_URL.match(url) else f"{excerpt(url)} is not an http:// or https:// URL"


class S3Output(Frozen):
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if (problem := bucket_name_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        if v is not None and (problem := endpoint_url_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_safe(cls, v: str) -> str:
        if "\x00" in v or ".." in v.split("/"):
            raise ValueError("prefix may not contain '..' segments or NUL bytes")
        return v.strip("/")


class HubOutput(Frozen):
    repo_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
    private: bool = True
    revision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199}$")


class Outputs(Frozen):
    s3: S3Output | None = None
    hub: HubOutput | None = None


class Credentials(Frozen):
    hf_token: SecretStr | None = None
    wandb_api_key: SecretStr | None = None
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None

    @field_validator("*")
    @classmethod
    def _fits_an_environment_variable(cls, v: SecretStr | None) -> SecretStr | None:
        """A credential reaches the stage children as an environment variable, which cannot hold a NUL."""
        if v is not None and any(c in v.get_secret_value() for c in "\x00\n\r"):
            raise ValueError("contains a NUL byte or a line break; paste the credential alone")
        return v

    def secrets(self) -> list[str]:
        return [v.get_secret_value() for v in self.__dict__.values() if v is not None and v.get_secret_value()]


class S3Config(Frozen):
    """RunPod's per-job `s3Config` (beside `input`): a bucket and its credentials, which come before the
    endpoint's BUCKET_* (parse_s3_config builds it; its secrets are never shown)."""

    bucket_name: str | None = None
    access_id: SecretStr | None = None
    access_secret: SecretStr | None = None
    endpoint_url: str | None = None

    def secrets(self) -> list[str]:
        return [v.get_secret_value() for v in (self.access_id, self.access_secret) if v is not None]


# s3Config's keys (RunPod's names) → S3Config's fields
S3CONFIG_FIELDS = {
    "bucketName": "bucket_name",
    "accessId": "access_id",
    "accessSecret": "access_secret",
    "endpointUrl": "endpoint_url",
}
S3CONFIG_RULES = {"bucketName": bucket_name_problem, "endpointUrl": endpoint_url_problem}


def parse_s3_config(raw: Any) -> tuple[S3Config | None, list[Issue]]:
    """RunPod's s3Config as an S3Config (None when absent), or every problem at `s3Config.<key>`; a
    credential's value is never quoted. Empty values count as absent; unknown keys are ignored."""
    if raw is None:
        return None, []
    if not isinstance(raw, Mapping):
        return None, [Issue("s3Config", f"must be an object of {', '.join(S3CONFIG_FIELDS)}, got {type(raw).__name__}")]
    issues: list[Issue] = []
    values: dict[str, str] = {}
    for key, name in S3CONFIG_FIELDS.items():
        value = raw.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            issues.append(Issue(f"s3Config.{key}", f"must be a string, got {type(value).__name__}"))
        elif any(c in value for c in "\x00\n\r"):
            issues.append(Issue(f"s3Config.{key}", "contains a NUL byte or a line break"))
        elif key in S3CONFIG_RULES and (problem := S3CONFIG_RULES[key](value)) is not None:
            issues.append(Issue(f"s3Config.{key}", problem))
        else:
            values[name] = value
    return (None, issues) if issues else (S3Config.model_validate(values), [])


class TimeLimits(Frozen):
    """Seconds; None means no limit for that stage."""

    preprocess_s: float | None = Field(default=3600, gt=0)
    train_s: float | None = Field(default=None, gt=0)
    publish_s: float | None = Field(default=1800, gt=0)
    no_progress_s: float | None = Field(default=900, gt=0)


class JobInput(Frozen):
    run_id: str
    config: TrainingConfig
    outputs: Outputs = Outputs()
    publish: list[PublishKind] = ["adapter"]
    resume: bool = True
    limits: TimeLimits = TimeLimits()
    credentials: Credentials = Credentials()
    allow_cpu: bool = False
    allow_oom_risk: bool = False  # run even when the predicted peak exceeds the GPU's free memory
    user_id: str | None = None  # axolotl's worker payloads carry these; kept in job.json for the caller
    model_id: str | None = None

    def public_dict(self) -> dict[str, Any]:
        """The job as it may be written to disk or shown: no credentials."""
        return self.model_dump(mode="json", exclude={"credentials"})


JOB_KEYS = frozenset({"args"}).union(*(m.model_fields for m in (JobInput, Outputs, S3Output, HubOutput, TimeLimits)))
# axolotl's RunPod worker: keys of its payloads (.runpod/test-input.json) that its handler never reads
AXOLOTL_WORKER_KEYS = {
    "name": None,
    "timeout": "timeout is the RunPod Hub test runner's wait (ms) in axolotl's worker payloads, not a "
    "job limit; ftw's limits are limits.preprocess_s/train_s/publish_s/no_progress_s, and "
    "the request's policy.executionTimeout bounds the whole job",
}


def check_run_id(value: Any) -> str | None:
    """None when `value` is a safe run id; else which rule it breaks (it names a folder and an S3 prefix)."""
    if not isinstance(value, str):
        return f"run_id must be a string, got {type(value).__name__}"
    if RUN_ID_PATTERN.fullmatch(value):
        return None
    if not value:
        reason = "it is empty"
    elif "\x00" in value:
        reason = "it contains a NUL byte"
    elif not value.isascii():
        reason = "it contains non-ASCII characters"
    elif "/" in value or "\\" in value:
        reason = "it contains a path separator"
    elif len(value) > 64:
        reason = f"it is {len(value)} characters long"
    elif value.startswith((".", "_", "-")):
        reason = f"it starts with {value[0]!r}"
    else:
        reason = "it contains characters other than letters, digits, '.', '_' and '-'"
    return (
        f"run_id {excerpt(value)} is not allowed: {reason}; use 1-64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


def run_id_from_job_id(job_id: str | None) -> str:
    """A RunPod job id made safe as a run id (RunPod ids are already mostly safe)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", job_id or "").strip("-._")[:64]
    return cleaned or "run"


def unwrap_input(raw: Any) -> Any:
    """The RunPod envelope `{"input": {...}}` (with `id` and friends) or the bare input."""
    if isinstance(raw, Mapping) and "input" in raw and "config" not in raw and "args" not in raw:
        return raw["input"]
    return raw


def validate_job(raw: Any, job_id: str | None = None, env: Mapping[str, str] | None = None) -> Report:
    """Every problem of a job at once; `report.value` is the JobInput when valid.

    No credential value appears in any message: pydantic's echo is off under `credentials`, and
    any credential string found elsewhere in a message is masked.
    """
    env = os.environ if env is None else env
    report = Report()
    raw = unwrap_input(raw)
    if not isinstance(raw, Mapping):
        report.error("input", f"the job input must be a JSON object, got {type(raw).__name__}")
        return report
    problem = shape_problem(raw)
    if problem:
        report.error("input", f"the job input {problem}")
        return report
    data = dict(raw)
    if "config" in data and "args" in data:
        report.error("args", "give the training config once, as config (or its alias args), not both")
    config_raw = data.pop("config", data.pop("args", None))
    config_report = Report()
    if config_raw is None and ("base_model" in data or "datasets" in data):  # a bare training config, not a job
        report.error(
            "input",
            "this is a training config, not a job: a job holds it under config, as "
            '{"input": {"run_id": "...", "config": {<these keys>}}} (see docs/config.md, Job input); '
            "ftw validate and ftw train take the config file as it is",
        )
        return report
    if config_raw is None:
        report.error("config", "required key is missing: the training config (axolotl YAML keys) goes under config")
    else:
        config_report = validate_config(config_raw, env)
        report.extend(config_report, prefix="config")
    if data.get("run_id") in (None, "default_run_id"):  # axolotl's worker default would make every job one run
        data["run_id"] = run_id_from_job_id(job_id)
    problem = check_run_id(data["run_id"])
    if problem:
        report.error("run_id", problem)
    _drop_unknown_keys(data, report)
    # while the config has errors, a stand-in (never returned) lets the job's other keys be checked
    placeholder = config_report.value or TrainingConfig.model_construct(base_model="", learning_rate=0.0)
    try:
        job = JobInput.model_validate({**data, "config": placeholder})
    except ValidationError as e:
        # config and run_id were checked above with better messages; credentials never reach an Issue here
        report.errors += [_suggest(i) for i in pydantic_issues(e, skip=("config", "run_id", *SECRET_KEYS))]
        report.errors += _credential_issues(e)
    else:
        if report.valid:
            report.value = job
    return _masked(report.capped(), _credential_strings(raw.get("credentials")))


CREDENTIAL_KEYS = tuple(Credentials.model_fields)
# A credential *name*: snake_case words in one case, short words, few digits. Anything else (a
# pasted token used as a key) is not shown: a token is long, mixed-case or digit-heavy.
CREDENTIAL_NAME = re.compile(r"[a-z][a-z0-9]{0,15}(?:_[a-z0-9]{1,16})*|[A-Z][A-Z0-9]{0,15}(?:_[A-Z0-9]{1,16})*")


def _shows_as_name(key: Any) -> bool:
    return (
        isinstance(key, str)
        and len(key) <= 40
        and sum(c.isdigit() for c in key) <= 3
        and bool(CREDENTIAL_NAME.fullmatch(key))
    )


def _credential_issues(exc: ValidationError) -> list[Issue]:
    """Errors under `credentials`, naming the key (names are not secret), never showing a value."""
    accepted = ", ".join(CREDENTIAL_KEYS)
    issues = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if not loc or loc[0] != "credentials":
            continue
        if len(loc) == 1:
            issues.append(
                Issue("credentials", f"must be an object of credential names to strings; accepted names: {accepted}")
            )
            continue
        key = loc[1]
        if not _shows_as_name(key):
            issues.append(
                Issue(
                    "credentials",
                    "a key that looks like a secret value (not shown) is not a credential "
                    f"name; accepted names: {accepted}",
                )
            )
        elif err["type"] == "extra_forbidden":
            issues.append(
                Issue(f"credentials.{key}", f"unknown key; accepted: {accepted}{did_you_mean(key, CREDENTIAL_KEYS)}")
            )
        elif err["type"] == "string_type":
            issues.append(Issue(f"credentials.{key}", "must be a string"))
        else:
            issues.append(Issue(f"credentials.{key}", err["msg"].removeprefix("Value error, ")))
    return issues


def _credential_strings(credentials: Any) -> list[str]:
    """What to mask in every message: the values of a credentials block, and keys not shown as names."""
    if not isinstance(credentials, Mapping):
        return _strings(credentials)
    return [s for k, v in credentials.items() for s in ([] if _shows_as_name(k) else _strings(k)) + _strings(v)]


def _drop_unknown_keys(data: dict[str, Any], report: Report) -> None:
    """Top-level keys the job model does not know are ignored, with a warning where one helps."""
    for key in [k for k in data if k not in JobInput.model_fields]:
        value = data.pop(key)
        if key in AXOLOTL_WORKER_KEYS:
            hint = AXOLOTL_WORKER_KEYS[key]
            if hint and value is not None:
                report.warn(key, hint)
        elif not _shows_as_name(key):
            report.warn("input", "a key that is not a name (not shown) is ignored")
        else:
            warn_unknown(key, JOB_KEYS, report)


def _suggest(issue: Issue) -> Issue:
    """An unknown job key gets the closest known one, as config keys do."""
    if issue.msg != "unknown key":
        return issue
    return Issue(issue.loc, f"unknown key{did_you_mean(issue.loc.split('.')[-1], JOB_KEYS)}", issue.kind)


def _strings(value: Any) -> list[str]:
    """Every string (keys too) inside a JSON value: what a credentials block could hold."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def _masked(report: Report, secrets: list[str]) -> Report:
    redactor = Redactor(s for s in secrets if len(s) >= MIN_MASKED_LEN)
    report.errors = [Issue(redactor.text(i.loc), redactor.text(i.msg), i.kind) for i in report.errors]
    report.warnings = [Issue(redactor.text(i.loc), redactor.text(i.msg), i.kind) for i in report.warnings]
    return report

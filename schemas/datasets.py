"""Dataset entries of a training config, with axolotl's key names.

A `type` is either a prompt-strategy name from the closed list below, or the dict form
(user-defined instruction format). Dotted module types (`pkg.mod`) execute code on the worker
and are refused by `schemas.validate` unless the operator allows plugins.
"""

# No `from __future__ import annotations` here: pydantic builds models from real types faster than
# from strings, and these models are built on every `ftw validate` start.
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from schemas.base import Frozen

# Strategy names ftw implements (worker/data/strategies). `chat_template.default` is axolotl's
# spelling of the same loader.
SUPPORTED_TYPES = (
    "alpaca",
    "alpaca:chat",
    "alpaca:chatml",
    "alpaca:phi",
    "chat_template",
    "chat_template.default",
    "completion",
    "input_output",
)

# axolotl strategy families that exist but ftw does not implement: a clear error, not a guess.
KNOWN_UNSUPPORTED_TYPES = (
    "bradley_terry",
    "ebft",
    "ebft_pretrain",
    "ebft_strided_chat",
    "ebft_strided_structured",
    "ebft_opencode",
    "orpo",
    "dpo",
    "kto",
    "stepwise_supervised",
    "metharme",
    "pygmalion",
    "oasst",
    "gpteacher",
    "reflection",
    "explainchoice",
    "concisechoice",
    "summarizetldr",
    "jeopardy",
    "context_qa",
    "creative_acr",
    "alpaca_w_system",
    "llama2_chat",
    "user_defined",
    "messages",
    "orcamini",
    "alpaca_chat",
    "alpaca_instruct",
    "base",
    "chatml",
)

TRAIN_ON_EOS = Literal["all", "turn", "last", "none"]


class UserDefinedFormat(Frozen):
    """The dict form of `type`: field names and a format string with {instruction}/{input}."""

    field_system: str | None = None
    field_instruction: str | None = None
    field_input: str | None = None
    field_output: str | None = None
    system_prompt: str | None = None
    system_format: str | None = None
    format: str | None = None
    no_input_format: str | None = None
    # preference pairs (rl: dpo/ipo/orpo/simpo): raw text, axolotl's user_defined.default
    field_prompt: str | None = None
    field_chosen: str | None = None
    field_rejected: str | None = None
    prompt_format: str | None = None
    chosen_format: str | None = None
    rejected_format: str | None = None


class MessagePropertyMappings(Frozen):
    model_config = ConfigDict(extra="allow")
    role: str = "role"
    content: str = "content"


class DatasetConfig(Frozen):
    # the source
    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | None = None
    ds_type: Literal["json", "jsonl", "parquet", "csv", "arrow", "text"] | None = None
    revision: str | None = None
    shards: int | None = Field(default=None, ge=1)
    shards_idx: int | None = Field(default=None, ge=0)
    preprocess_shards: int | None = None
    # the prompt strategy
    type: str | UserDefinedFormat | None = None
    field: str | None = None
    text_column: str | None = None
    train_on_split: str | None = None
    # chat_template strategy
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    field_messages: str = "messages"
    field_system: str | None = None
    field_tools: str | None = None
    message_property_mappings: MessagePropertyMappings | None = None
    message_field_role: str | None = None
    message_field_content: str | None = None
    message_field_training: str | None = None
    roles: dict[str, list[str]] | None = None
    roles_to_train: list[str] | None = None
    train_on_eos: TRAIN_ON_EOS | None = None
    train_on_eot: TRAIN_ON_EOS | None = None
    drop_system_message: bool | None = None
    # preference and RL rows (rl: ...): where chosen / rejected / completion / label / answer are
    field_prompt: str | None = None
    field_chosen: str | None = None
    field_rejected: str | None = None
    field_completion: str | None = None
    field_label: str | None = None
    field_answer: str | None = None
    # per-dataset overrides
    train_on_inputs: bool | None = None

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("path is empty: give a Hub dataset id, a local file or folder, s3:// or https:// URI")
        if "\x00" in v:
            raise ValueError("path contains a NUL byte")
        return v

    def strategy_name(self) -> str:
        """The strategy family: 'alpaca', 'chat_template', 'completion', 'input_output' or 'user_defined'."""
        if self.type is None:
            return "chat_template" if self.field_messages != "messages" else "alpaca"
        if isinstance(self.type, UserDefinedFormat):
            return "user_defined"
        return self.type.split(":")[0].split(".")[0]

    def role_key(self) -> str:
        if self.message_property_mappings is not None:
            return self.message_property_mappings.role
        return self.message_field_role or "role"

    def content_key(self) -> str:
        if self.message_property_mappings is not None:
            return self.message_property_mappings.content
        return self.message_field_content or "content"


class PretrainingDatasetConfig(Frozen):
    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | None = None
    type: str | None = "pretrain"
    text_column: str = "text"
    skip: int | None = None

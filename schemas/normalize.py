"""axolotl's spellings mapped onto the current keys, before any key is classified.

Returns a new dict and never changes its input: aliases (`model_type` → `type_of_model`),
`torch_dtype` → bf16/fp16, the legacy attention booleans → `attn_implementation`, axolotl's
bundled deepspeed JSON file names → presets, and `key: null` → the key's default (YAML's empty
value, as axolotl reads it; for bf16/tf32 null means off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.classify import TYPED_FIELDS
from schemas.config import DEEPSPEED_BUNDLED_FILES, LEGACY_ATTENTION_FLAGS
from schemas.issues import Report
from schemas.keys import ALIASES, TORCH_DTYPE_KEY, UNSUPPORTED, is_off
from schemas.limits import excerpt

NULL_MEANS_OFF = ("bf16", "tf32")


def normalize_keys(raw: Mapping[str, Any], report: Report) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ALIASES:
            target = ALIASES[key]
            if target in raw:
                report.warn(key, f"{key} is an alias of {target}, which is also set; {target} wins")
            elif value is not None:
                out[target] = value
        elif key == TORCH_DTYPE_KEY:
            _torch_dtype(value, raw, out, report)
        elif key in LEGACY_ATTENTION_FLAGS:
            _legacy_attention(key, value, raw, out, report)
        elif key == "deepspeed" and isinstance(value, str):
            out[key] = _deepspeed_preset(value, report)
        elif value is None and key in TYPED_FIELDS:
            if key in NULL_MEANS_OFF:
                out[key] = False
        else:
            out[key] = value
    return out


def _torch_dtype(value: Any, raw: Mapping[str, Any], out: dict[str, Any], report: Report) -> None:
    if value in ("bfloat16", "bf16"):
        if "bf16" not in raw:
            out["bf16"] = True
    elif value in ("float16", "fp16"):
        if "fp16" not in raw:
            out["fp16"] = True
    elif value not in (None, "auto", "float32", "fp32"):
        report.error(
            TORCH_DTYPE_KEY, f"torch_dtype {excerpt(value)} is not known; use bf16: true, fp16: true or leave it unset"
        )


def _legacy_attention(key: str, value: Any, raw: Mapping[str, Any], out: dict[str, Any], report: Report) -> None:
    impl = LEGACY_ATTENTION_FLAGS[key]
    if is_off(value):
        return
    if impl is None:
        report.error(key, f"{key} is not supported by ftw ({UNSUPPORTED[key]}); remove it", "unsupported")
    elif raw.get("attn_implementation") not in (None, impl):
        report.error(
            key, f"{key}: true conflicts with attn_implementation: {excerpt(raw['attn_implementation'])}; keep one"
        )
    elif out.get("attn_implementation") not in (None, impl):
        report.error(
            key, f"{key} and another legacy attention flag are both set; keep one (or set attn_implementation)"
        )
    else:
        out["attn_implementation"] = impl


def _deepspeed_preset(value: str, report: Report) -> str:
    """axolotl's examples name its bundled JSON files; ftw has the same presets built in."""
    name = value.strip().removeprefix("./").removeprefix("deepspeed_configs/")
    preset = DEEPSPEED_BUNDLED_FILES.get(name)
    if preset is None or name == value.strip():
        return value
    report.warn(
        "deepspeed",
        f"{excerpt(value)} is one of axolotl's bundled DeepSpeed files; ftw uses its built-in preset {preset!r}",
    )
    return preset

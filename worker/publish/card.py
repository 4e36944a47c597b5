"""The model card (README.md) of a Hub publish, built from the run: no secret, no local path.

It states the base model, the datasets, the hyperparameters, the metrics of RUN_DIR/summary.json,
the loss curve (loss.png, committed beside it) and how to load the result with peft and with vLLM.
Local names are shown as `local file <name>` (never a path), and the finished text goes through
`scrub`, which masks every known secret and any absolute path that slipped in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from schemas.config import TrainingConfig
from schemas.paths import is_local, is_remote
from schemas.secrets import Redactor

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
# An absolute path: '/' or '~/' not preceded by a URL or word character, followed by at least one segment.
LOCAL_PATH = re.compile(r"(?<![\w:/.\-])(?:~|[A-Za-z]:)?/(?:[\w.\-]+/)*[\w.\-]+")
HYPERPARAMETERS = (
    "adapter",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "learning_rate",
    "lr_scheduler",
    "optimizer",
    "num_epochs",
    "max_steps",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "sequence_len",
    "sample_packing",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "seed",
    "bf16",
    "load_in_4bit",
    "train_on_inputs",
)


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id, else None (local folders and URLs are not)."""
    if not name or is_local(name) or is_remote(name):
        return None
    return name if HUB_ID.match(name) else None


def base_model_id(name: str) -> str | None:
    """The base model's Hub id: the name itself, or read from a Hub cache folder
    (`…/models--org--name/snapshots/<sha>`); None for any other local folder."""
    if hub_id(name):
        return name
    for part in Path(name.removeprefix("file://")).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return hub_id("/".join(part.removeprefix("models--").split("--", 1)))
    return None


def public_name(name: str) -> str:
    """How a model or dataset is named in public: a Hub id as is, anything else without its path."""
    if hub_id(name):
        return name
    if is_remote(name):
        return name.split("?")[0].rsplit("/", 1)[-1] + " (remote file)"
    return Path(name.removeprefix("file://")).name + " (local file)"


def scrub(text: str, redactor: Redactor) -> str:
    return LOCAL_PATH.sub("<local path>", redactor.text(text))


def _metrics(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    flat = {}
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue  # curves and nested records are in the image / the logs artifact
        flat[key] = round(value, 6) if isinstance(value, float) else value
    return flat


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values] if values else []


def model_card(
    cfg: TrainingConfig,
    repo_id: str,
    run_id: str,
    run_dir: Path,
    *,
    base_id: str | None,
    has_loss_png: bool,
    merged_path: str | None,
    redactor: Redactor,
) -> str:
    datasets = [public_name(d.path) for d in (cfg.datasets or [])]
    hub_datasets = [d.path for d in (cfg.datasets or []) if hub_id(d.path)]
    base = base_id or public_name(cfg.base_model)
    is_adapter = cfg.adapter is not None
    front = [
        "---",
        *([f"base_model: {base_id}"] if base_id else []),
        f"library_name: {'peft' if is_adapter else 'transformers'}",
        *_yaml_list("datasets", hub_datasets),
        *_yaml_list("tags", ["ftw", *([cfg.adapter] if is_adapter else ["full-fine-tune"])]),
        "---",
    ]
    lines = [
        *front,
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{f'A {cfg.adapter.upper()} adapter' if cfg.adapter is not None else 'A full fine-tune'} of **{base}**, "
        f"trained with ftw (run `{run_id}`).",
        "",
        "## Training data",
        "",
    ]
    lines += [f"- {name}" for name in datasets] or ["- (not recorded)"]
    lines += ["", "## Hyperparameters", "", "| key | value |", "|---|---|"]
    for key in HYPERPARAMETERS:
        value = getattr(cfg, key, None)
        if value is not None and value is not False:
            lines.append(f"| {key} | {json.dumps(value) if not isinstance(value, str) else value} |")
    metrics = _metrics(run_dir)
    if metrics:
        lines += [
            "",
            "## Results",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in metrics.items()),
        ]
    if has_loss_png:
        lines += ["", "![training loss](loss.png)"]
    lines += ["", "## Use it", ""]
    if is_adapter:
        lines += [
            "With peft:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
            "With vLLM:",
            "",
            "```bash",
            f"vllm serve {base_id or '<base model>'} --enable-lora --max-lora-rank {max(cfg.lora_r, 8)} \\",
            f"  --lora-modules adapter={repo_id}",
            "```",
        ]
        if merged_path:
            lines += ["", f"The merged model (base + adapter) is in the `{merged_path}/` folder of this repo."]
    else:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
            "```bash",
            f"vllm serve {repo_id}",
            "```",
        ]
    lines += ["", "Every file is listed with its sha256 in `manifest.json`; `ftw pull` verifies them.", ""]
    return scrub("\n".join(lines), redactor)

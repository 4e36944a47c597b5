"""Test helpers of the train stage: a synthetic task, a prepared cache written to the contract
(docs/contracts.md), and the real train child started as a subprocess."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO, child_env, randomise_lora_b

DIGITS = "0123456789"


def successor_task(seed: int = 0, n_digits: int = 3) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """'3 7 1 ->' answers ' 4 8 2' (each digit + 1 mod 10): 1000 prompts, 800 train / 200 held out."""
    pairs = []
    for n in range(10**n_digits):
        ds = f"{n:0{n_digits}d}"
        pairs.append((" ".join(ds) + " ->", " " + " ".join(str((int(d) + 1) % 10) for d in ds)))
    random.Random(seed).shuffle(pairs)
    return pairs[:800], pairs[800:]


def tokenize(tok, pairs: list[tuple[str, str]]) -> list[dict[str, list[int]]]:
    """Prompt masked (-100), answer + eos trained; one row per sample."""
    rows = []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a, "position_ids": list(range(len(p) + len(a)))})
    return rows


def pack(rows: list[dict[str, list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """First-fit bins of ≤ capacity tokens, position_ids restarting per sample (the contract's packing)."""
    bins: list[dict[str, list[int]]] = []
    for r in rows:
        for b in bins:
            if len(b["input_ids"]) + len(r["input_ids"]) <= capacity:
                break
        else:
            b = {"input_ids": [], "labels": [], "position_ids": []}
            bins.append(b)
        for k in b:
            b[k] += r[k]
    return bins


def write_cache(
    root: Path,
    train: list[dict],
    evaluation: list[dict] | None = None,
    packed: bool = False,
    sequence_len: int = 64,
    micro_batch_size: int = 1,
) -> Path:
    """A prepared-data cache exactly as docs/contracts.md defines it (manifest written last)."""
    from datasets import Dataset, Features, Sequence, Value

    feats = Features({k: Sequence(Value("int32")) for k in ("input_ids", "labels", "position_ids")})
    root.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(train, features=feats).save_to_disk(str(root / "train"))
    if evaluation:
        Dataset.from_list(evaluation, features=feats).save_to_disk(str(root / "eval"))
    manifest = {
        "complete": True,
        "fingerprint": root.name,
        "rows": {"train": len(train), "eval": len(evaluation or [])},
        "tokens": {"train": sum(len(r["input_ids"]) for r in train)},
        "packing": {"enabled": packed, "fill": None, "bins": len(train) if packed else None},
        "sequence_len": sequence_len,
        "micro_batch_size": micro_batch_size,
        "versions": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def base_config(model_dir: Path, **over: Any) -> dict[str, Any]:
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": "unused.jsonl", "type": "completion"}],
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "learning_rate": 1e-3,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "sequence_len": 64,
        "seed": 7,
    }
    cfg.update(over)
    return cfg


def write_config(run_dir: Path, cfg: dict[str, Any]) -> Path:
    from schemas.config import TrainingConfig

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    path.write_text(TrainingConfig.model_validate(cfg).model_dump_json())
    return path


def train_argv(config_json: Path, run_dir: Path, cache: Path, nproc: int = 1) -> list[str]:
    args = ["-m", "worker.train", str(config_json), "--run-dir", str(run_dir), "--data", str(cache)]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


def train_env(run_dir: Path, threads: int = 1) -> dict[str, str]:
    return child_env(
        FTW_EVENTS=str(run_dir / "events.jsonl"),
        FTW_ERROR_FILE=str(run_dir / "error.json"),
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )


def run_train(
    cfg: dict[str, Any], run_dir: Path, cache: Path, nproc: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    config_json = write_config(run_dir, cfg)
    return subprocess.run(
        train_argv(config_json, run_dir, cache, nproc),
        env=train_env(run_dir),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def run_inprocess(cfg: dict[str, Any], run_dir: Path, cache: Path) -> int:
    """The train stage in this process (one rank), for tests that compare numbers, not processes."""
    import torch

    from schemas.config import TrainingConfig
    from worker.train.child import run

    torch.set_num_threads(1)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        return run(TrainingConfig.model_validate(cfg), run_dir, cache)
    finally:  # the stage turns TF32 on for its whole process: the tests after this one keep their fp32 matmuls
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def resumed_matches_uninterrupted(cfg: dict[str, Any], cache: Path, tmp_path: Path, step: int) -> dict[str, Any]:
    """Train `cfg` uninterrupted, then again from its checkpoint at `step`: both adapters must agree
    (rtol 1e-5, atol 1e-7). The uninterrupted run's adapter is returned."""
    import torch

    assert run_inprocess(cfg, tmp_path / "reference", cache) == 0
    reference = adapter_tensors(tmp_path / "reference" / "adapter")
    checkpoint = tmp_path / "reference" / "checkpoints" / f"checkpoint-{step}"
    assert run_inprocess({**cfg, "resume_from_checkpoint": str(checkpoint)}, tmp_path / "resumed", cache) == 0
    got = adapter_tensors(tmp_path / "resumed" / "adapter")
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    return reference


def resumed_packed_run(model_dir: Path, rows: list, tmp_path: Path, step: int, n_rows: int = 96, **over: Any):
    """`resumed_matches_uninterrupted` for 2 × `step` steps over the first `n_rows` rows packed into 64-token rows,
    one a micro-batch, lr 3e-3, resumed from the checkpoint at `step`; `over`: the config's other keys."""
    cache = write_cache(tmp_path / "cache", pack(rows[:n_rows], 64), packed=True, sequence_len=64)
    config = {"micro_batch_size": 1, "max_steps": 2 * step, "save_steps": step, "learning_rate": 3e-3, **over}
    return resumed_matches_uninterrupted(base_config(model_dir, **config), cache, tmp_path, step)


# the schedule that teaches a tiny model the successor task (input_output rows) in minutes on a CPU
SUCCESSOR_SCHEDULE: dict[str, Any] = {
    "sequence_len": 16,
    "sample_packing": True,
    "micro_batch_size": 16,
    "num_epochs": 4,
    "learning_rate": 5e-3,
    "lr_scheduler": "cosine",
    "warmup_steps": 10,
    "optimizer": "adamw_torch",
    "saves_per_epoch": 1,
    "logging_steps": 5,
    "seed": 3,
}


def write_segments(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """The pairs as input_output rows (prompt untrained; answer and <|im_end|> trained), one JSON line each."""
    rows = (
        {
            "segments": [
                {"label": False, "text": prompt},
                {"label": True, "text": answer},
                {"label": True, "text": "<|im_end|>"},
            ]
        }
        for prompt, answer in pairs
    )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ftw_cli(args: list[str], volume: Path, timeout: float, **env: str) -> dict[str, Any]:
    """`python -m worker.cli ARGS` on CPU over `volume` (BASE_VOLUME), with `env` added; it must exit 0.
    Its result: the JSON of its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=child_env(BASE_VOLUME=str(volume), FTW_ALLOW_CPU="1", OMP_NUM_THREADS="1", **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_job(job: dict[str, Any], folder: Path, volume: Path, timeout: float, **env: str) -> dict[str, Any]:
    """`ftw run` of `job` (written to folder/job.json), as `ftw_cli` runs it."""
    path = folder / "job.json"
    path.write_text(json.dumps(job))
    return ftw_cli(["run", str(path)], volume, timeout, **env)


def run_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event of a run folder (each stage's events.jsonl, wherever it lies under the folder)."""
    return [json.loads(line) for f in run_dir.rglob("events.jsonl") for line in f.read_text().splitlines()]


def greedy(model: Any, tok: Any, prompt: str) -> str:
    """The model's greedy answer to `prompt` (text, no special tokens added), up to 8 tokens."""
    import torch

    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def cpu_lora_model(model_dir: Path, **overrides: Any):
    """The tiny model as ftw's trainer builds it on the CPU (its loader, checkpointing included, and its LoRA,
    no dropout), every LoRA B randomised so each gradient path carries signal; one thread, so numbers repeat."""
    import torch

    from schemas.config import TrainingConfig
    from worker.data.tokenizer import load_tokenizer
    from worker.train.adapters import attach
    from worker.train.model import load_model, resolve_precision

    cpu = torch.device("cpu")
    torch.set_num_threads(1)
    cfg = TrainingConfig.model_validate(base_config(model_dir, lora_dropout=0.0, **overrides))
    torch.manual_seed(0)
    model = attach(load_model(cfg, load_tokenizer(cfg), resolve_precision(cfg, cpu), cpu), cfg)
    randomise_lora_b(model, std=0.02)
    return model.train()

"""`ftw estimate` as a user runs it: a config or a job, every RunPod GPU type or one, text or JSON,
CPU only and without torch; the model's shape from a local folder or ftw's table of common models;
the data's size from a prepared cache (exact) or from the local files (estimated)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, child_env
from worker.estimate.gpus import gpu_table
from worker.estimate.shapes import known_name, known_shape

EXAMPLE_DATA = REPO / "examples" / "data" / "greetings.jsonl"
JSON_KEYS = {"name", "memory_gib", "fits", "peak_memory_gib", "tokens_per_s", "time_s", "cost_usd"}


def config(**overrides) -> dict:
    return {
        "base_model": "meta-llama/Llama-3.1-8B-Instruct",
        "datasets": [{"path": "./data/chat.jsonl", "type": "chat_template"}],
        "adapter": "lora",
        "lora_r": 16,
        "lora_target_linear": True,
        "sequence_len": 2048,
        "sample_packing": True,
        "micro_batch_size": 4,
        "max_steps": 500,
        "learning_rate": 1e-4,
        **overrides,
    }


@pytest.fixture
def data_volume(tmp_path) -> Path:
    """greetings.jsonl (22 rows) and chat.jsonl: 3,000 rows of ~1,900 characters, ~1.5M tokens."""
    (tmp_path / "vol" / "data").mkdir(parents=True)
    (tmp_path / "vol" / "data" / "greetings.jsonl").write_bytes(EXAMPLE_DATA.read_bytes())
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jovial kings".split()
    with open(tmp_path / "vol" / "data" / "chat.jsonl", "w") as f:
        for i in range(3000):
            text = " ".join(words[(i + k) % len(words)] for k in range(170))
            f.write(
                json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]})
                + "\n"
            )
    return tmp_path / "vol"


def estimate(path: Path, volume: Path, *flags: str) -> subprocess.CompletedProcess:
    # in a child that fails if anything imported torch: the estimate is for the orchestrator side
    code = (
        "import sys; from worker.cli import main; rc = main(['estimate', *sys.argv[1:]]); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path), *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(BASE_VOLUME=str(volume), HF_HUB_OFFLINE="1"),
        timeout=120,
    )


def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc) if path.suffix == ".yml" else json.dumps(doc))
    return path


def test_json_lists_every_gpu_type_and_the_cheapest_that_fits(tmp_path, data_volume):
    r = estimate(write(tmp_path / "c.yml", config()), data_volume, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"gpus", "cheapest"} and all(set(g) == JSON_KEYS for g in out["gpus"])
    assert [g["name"] for g in out["gpus"]] == [g.name for g in gpu_table().gpus]
    by_name = {g["name"]: g for g in out["gpus"]}
    assert by_name["NVIDIA H200"]["fits"] and not by_name["NVIDIA L4"]["fits"]  # 8B LoRA at 4 × 2048: ~47 GiB
    assert 40 < by_name["NVIDIA H200"]["peak_memory_gib"] < 55 and by_name["NVIDIA H200"]["memory_gib"] == 140.4
    fitting = [g for g in out["gpus"] if g["fits"]]
    assert out["cheapest"] == min(fitting, key=lambda g: g["cost_usd"])["name"]
    h200 = by_name["NVIDIA H200"]
    price = gpu_table().find("NVIDIA H200").usd_per_s
    assert math.isclose(h200["cost_usd"], h200["time_s"] * price, abs_tol=0.01)
    assert 500 * 8000 / h200["tokens_per_s"] < h200["time_s"]  # 500 steps of ~8k tokens plus the start


def test_gpu_flag_limits_the_list_and_an_unknown_type_lists_the_known_ones(tmp_path, data_volume):
    path = write(tmp_path / "c.yml", config())
    r = estimate(path, data_volume, "--json", "--gpu", "nvidia l40s")
    assert r.returncode == 0 and [g["name"] for g in json.loads(r.stdout)["gpus"]] == ["NVIDIA L40S"]
    assert json.loads(r.stdout)["cheapest"] is None
    r = estimate(path, data_volume, "--gpu", "NVIDIA K80")
    assert r.returncode == 2 and "unknown GPU type 'NVIDIA K80'" in r.stderr and "NVIDIA H200" in r.stderr


def test_text_gives_advice_with_its_effect_where_it_does_not_fit(tmp_path, data_volume):
    r = estimate(write(tmp_path / "c.yml", config()), data_volume, "--gpu", "NVIDIA L4")
    assert r.returncode == 0, r.stderr
    assert "does not fit on NVIDIA L4" in r.stdout and "to fit on NVIDIA L4" in r.stdout
    lines = {line.split(":")[0].strip(): line for line in r.stdout.splitlines() if line.startswith("  ")}
    assert "(fits)" in lines["gradient_checkpointing"]
    slower = float(re.search(r"([0-9.]+)× the tokens/s", lines["gradient_checkpointing"]).group(1))
    assert 0.6 <= slower < 1.0  # the recompute costs time: each layer's forward again, less its down projection
    assert any(k.startswith("micro_batch_size") for k in lines) and "adapter" in lines
    assert "docs.runpod.io/serverless/pricing, read 2026-12-02" in r.stdout


def test_a_job_file_and_a_local_model_folder(tmp_path, data_volume):
    """Only the folder's config.json is read (no weights needed)."""
    model = data_volume / "models" / "small"
    model.mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 512,
                "intermediate_size": 1536,
                "num_hidden_layers": 8,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "vocab_size": 32000,
                "tie_word_embeddings": True,
            }
        )
    )
    job = {"input": {"run_id": "est", "config": config(base_model=str(model), max_steps=None, num_epochs=2)}}
    r = estimate(write(tmp_path / "job.json", job), data_volume, "--json", "--gpu", "NVIDIA RTX A4000")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["gpus"][0]
    assert row["fits"] and 1 < row["peak_memory_gib"] < 4 and row["time_s"] > 0
    text = estimate(write(tmp_path / "job.json", job), data_volume).stdout
    assert f"model: {model}" in text and "estimated from the local files" in text


def test_an_invalid_config_or_unknown_model_is_a_clear_error(tmp_path, data_volume):
    r = estimate(write(tmp_path / "bad.yml", config(micro_batch_size=0)), data_volume)
    assert r.returncode == 3 and "micro_batch_size" in r.stderr
    r = estimate(write(tmp_path / "c.yml", config(base_model="someone/private-model")), data_volume)
    assert r.returncode == 2 and "someone/private-model: shape unknown" in r.stderr and "config.json" in r.stderr


def test_without_max_steps_or_readable_data_the_time_is_unknown_but_memory_is_not(tmp_path, data_volume):
    cfg = config(max_steps=None, datasets=[{"path": "org/remote-data", "type": "chat_template"}])
    out = json.loads(estimate(write(tmp_path / "c.yml", cfg), data_volume, "--json").stdout)
    assert all(g["time_s"] is None and g["cost_usd"] is None and g["peak_memory_gib"] > 40 for g in out["gpus"])
    assert out["cheapest"] is not None  # then by price per token
    given = json.loads(estimate(write(tmp_path / "c.yml", cfg), data_volume, "--json", "--tokens", "10000000").stdout)
    assert all(g["time_s"] for g in given["gpus"])


@pytest.mark.slow
def test_the_prepared_cache_gives_the_exact_token_count(tmp_path, data_volume, tiny_model_dir):
    """After `ftw preprocess`, the estimate counts the cache's tokens, not the files' characters."""
    model = shutil.copytree(tiny_model_dir, data_volume / "models" / "tiny")
    cfg = write(
        tmp_path / "c.yml",
        config(
            base_model=str(model),
            sequence_len=256,
            micro_batch_size=2,
            max_steps=None,
            datasets=[{"path": "./data/greetings.jsonl", "type": "chat_template"}],
        ),
    )
    before = estimate(cfg, data_volume).stdout
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "preprocess", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(BASE_VOLUME=str(data_volume)),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    after = estimate(cfg, data_volume).stdout
    assert "estimated from the local files" in before
    share = summary["tokens"]["trained_share"]
    assert 0 < share < 1  # the chat template's prompts are not trained
    assert (
        f"data: {summary['tokens']['train']:,} tokens (counted in the prepared cache {summary['cache_dir']}), "
        f"{share:.0%} of them trained" in after
    )


@pytest.mark.parametrize(
    "model_id, name, billions",
    [
        ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b", 1.24),
        ("meta-llama/Llama-3.1-8B", "llama-3.1-8b", 8.03),
        ("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", None, None),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b", 7.62),
        ("Qwen/Qwen3-8B", "qwen3-8b", 8.19),
        ("Qwen/Qwen3-0.6B", "qwen3-0.6b", 0.60),
        ("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b", 30.5),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b", 7.25),
        ("google/gemma-2-9b-it", "gemma-2-9b", 9.24),
    ],
)
def test_the_table_has_the_published_sizes(model_id, name, billions):
    shape = known_shape(model_id)
    if name is None:  # not a name of the table: the Hub or a local folder has to say
        assert shape is None
        return
    assert known_name(model_id) == name and math.isclose(shape.params / 1e9, billions, rel_tol=0.01)


def test_the_gpu_table_is_complete_and_dated():
    table = gpu_table()
    names = [g.name for g in table.gpus]
    assert len(names) == len(set(names)) and table.source.startswith("https://docs.runpod.io/") and table.read_on
    assert all(g.memory_gib > 8 and 0 < g.usd_per_s < 0.01 and g.bf16_tflops > 10 for g in table.gpus)
    assert table.find("nvidia  h200") is table.find("NVIDIA H200") is not None


def test_a_lora_off_the_fused_kernels_is_estimated_as_peft_runs_it_and_told_how_to_get_them(tmp_path, data_volume):
    """DoRA keeps LoRA off ftw's fused kernels (the registry reads the same TrainingConfig.lora_unfused_by): PEFT's
    layers keep each projection's dropped-out input, so the run needs more memory and is slower, and where it does
    not fit the first advice is the fused kernels. lora_dropout runs inside them: priced as the fused path."""
    runs = {}
    for name, keys in {"plain": {}, "dropout": {"lora_dropout": 0.05}, "dora": {"peft_use_dora": True}}.items():
        r = estimate(write(tmp_path / f"{name}.yml", config(**keys)), data_volume, "--json")
        assert r.returncode == 0, r.stderr
        runs[name] = {g["name"]: g for g in json.loads(r.stdout)["gpus"]}["NVIDIA H100 80GB HBM3"]
    assert runs["dora"]["peak_memory_gib"] > 1.3 * runs["plain"]["peak_memory_gib"]
    assert runs["dora"]["tokens_per_s"] < 0.7 * runs["plain"]["tokens_per_s"]
    assert runs["dropout"]["peak_memory_gib"] == runs["plain"]["peak_memory_gib"]
    r = estimate(
        write(tmp_path / "c.yml", config(peft_use_dora=True, lora_dropout=0.05, micro_batch_size=8)),
        data_volume,
        "--gpu",
        "NVIDIA H100 80GB HBM3",
    )
    assert r.returncode == 0, r.stderr
    assert "kernels on, LoRA off the fused kernels" in r.stdout
    first = next(line for line in r.stdout.splitlines() if line.startswith("  "))
    assert first.strip().startswith("the fused LoRA kernels (peft_use_dora: false") and "(fits)" in first

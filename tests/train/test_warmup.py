"""The kernel warm-up child (worker/train/warmup.py): a one-layer copy of the job's model, built as the train
stage builds it (4-bit as load_in_4bit loads it, the job's adapter), one forward and backward on a batch of the
job's shape; run for real here, its compiled kernels written to the cache the train stage reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from schemas.config import TrainingConfig
from worker.train import warmup_lock
from worker.train.batches import IGNORE
from worker.train.warmup import batches, build, one_layer, warm


def config(model_dir, **kw) -> TrainingConfig:
    base = {"base_model": str(model_dir), "learning_rate": 1e-3, "adapter": "lora", "lora_r": 4, "lora_alpha": 8}
    base |= {"lora_target_linear": True, "sequence_len": 64, "micro_batch_size": 2, "sample_packing": True}
    return TrainingConfig.model_validate({**base, **kw})


def test_one_layer_keeps_the_shapes_and_cuts_the_per_layer_lists(tiny_model_dir):
    full = AutoConfig.from_pretrained(tiny_model_dir)
    full.layer_types = ["full_attention", "sliding_attention"] * (full.num_hidden_layers // 2)
    small = one_layer(full)
    assert small.num_hidden_layers == 1 and small.layer_types == ["full_attention"]
    assert (small.hidden_size, small.intermediate_size, small.vocab_size) == (
        full.hidden_size,
        full.intermediate_size,
        full.vocab_size,
    )
    assert full.num_hidden_layers > 1 and len(full.layer_types) == full.num_hidden_layers  # the original untouched


def test_the_batches_have_the_jobs_shape_and_both_kinds_of_length(tiny_model_dir):
    from worker.data.tokenizer import load_tokenizer

    packed_cfg = config(tiny_model_dir)
    tokenizer = load_tokenizer(packed_cfg)
    packed = batches(packed_cfg, tokenizer)
    assert [b["input_ids"].shape for b in packed] == [(1, 128), (1, 127)]  # a multiple of 16 and not
    assert all("attention_mask" not in b for b in packed)
    starts = (packed[0]["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, 85] and (packed[0]["labels"][0, starts] == IGNORE).all()  # two samples, unequal
    rows = batches(config(tiny_model_dir, sample_packing=False), tokenizer)
    assert [b["input_ids"].shape for b in rows] == [(2, 64), (2, 63)]
    assert rows[0]["attention_mask"].sum(dim=1).tolist() == [64, 42]  # padded rows, as an unpacked batch has


def test_a_qlora_job_warms_up_over_4bit_weights_with_its_adapter(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    cfg = config(tiny_model_dir, adapter="qlora", load_in_4bit=True)
    model, _, _, _ = build(cfg, torch.device("cpu"))
    base = model.get_base_model()
    assert len(base.model.layers) == 1
    up = base.model.layers[0].mlp.up_proj
    assert type(up).__module__ == "peft.tuners.lora.bnb"  # PEFT's bitsandbytes LoRA, as over load_in_4bit
    assert type(up.base_layer.weight).__name__ == "Params4bit" and up.base_layer.weight.quant_state is not None
    assert type(base.lm_head) is torch.nn.Linear  # the output layer stays dense, as load_in_4bit leaves it
    assert warm(cfg, torch.device("cpu"), warmup_lock.Hold(None)).startswith("its pass ")  # CPU: no recording


def test_the_child_compiles_into_the_jobs_cache(tiny_model_dir, tmp_path):
    """torch_compile on the CPU: Inductor's kernels for the one-layer model land in TORCHINDUCTOR_CACHE_DIR."""
    cfg = config(tiny_model_dir, torch_compile=True)
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    cache = tmp_path / "inductor"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.train.warmup", str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "kernel warm-up done" in proc.stdout
    assert any(p.is_file() for p in cache.rglob("*"))


def test_a_model_it_cannot_read_fails_the_child_not_silently(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(config(tmp_path / "missing").model_dump_json())
    proc = subprocess.run(
        [sys.executable, "-m", "worker.train.warmup", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1 and "kernel warm-up failed" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's JIT compiles on a GPU; here its interpreter runs")
def test_on_a_gpu_the_recording_misses_none_of_the_passes_kernels(tiny_model_dir, tmp_path):
    """The warm-up records its pass's kernels, compiles them side by side, and the pass after compiles none of them
    itself: each is read from the cache, so the recording found them all and they compiled as the JIT asks."""
    path = tmp_path / "config.json"
    path.write_text(config(tiny_model_dir, bf16=True).model_dump_json())
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.train.warmup", str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    done = proc.stdout.strip().splitlines()[-1]
    found = re.search(r"recorded (\d+) kernels .*\((\d+) kernels compiled in it, (\d+) read from the cache\)", done)
    assert found, done
    recorded, compiled_after, read = map(int, found.groups())
    assert recorded >= 5 and compiled_after == 0 and read == recorded, done

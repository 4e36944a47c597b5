"""The Unsloth arm of bench/train_throughput.py, used only in that arm's own process.

Unsloth must be imported before transformers in its process (it patches transformers, and sets its
CUDA allocator options, at import) and loads models only from a path: `prepare` has the seed-0
random-init model that the other arms build in memory saved by a process without Unsloth, then
imports Unsloth. Unsloth keeps packed samples apart only in its padding-free layout, one row per step
plus `packed_seq_lengths` (rows whose position ids restart but come without lengths attend across
samples), so `one_row` hands it each step's rows end to end: the same tokens, targets and attention
as the other arms get.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def model_folder(shape: str, seq: int) -> Path:
    return Path(tempfile.gettempdir()) / "ftw-bench-models" / f"{shape}-seq{seq}"


def save_random_init(cfg, folder: Path) -> None:
    """The model of `cfg` as the other arms build it (seed 0, bf16), with a word-level tokenizer whose
    pad token differs from eos (Unsloth refuses pad == eos); written aside, then renamed into place."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    v = cfg.vocab_size
    vocab = {**{f"t{i}": i for i in range(v - 3)}, "<s>": v - 3, "</s>": v - 2, "<pad>": v - 1}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="t0"
    ).save_pretrained(partial)
    partial.rename(folder)


def prepare(script: str, shape: str, seq: int) -> None:
    """The weights saved (once per shape on this machine) by `script --save-model`, then Unsloth imported,
    offline (the GPU machine has no internet)."""
    save_once(script, shape, seq)
    for switch in ("UNSLOTH_DISABLE_STATISTICS", "HF_HUB_OFFLINE"):
        os.environ.setdefault(switch, "1")
    # the peer under its own allocator: unsloth_zoo sets expandable segments where none is set (bench/gpu_step.sh's
    # setting is the one ftw's checks pick for ftw)
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    importlib.import_module("unsloth")


def save_once(script: str, shape: str, seq: int) -> Path:
    """`model_folder`, saved by `script --save-model` in a process of its own unless it already is (the
    QLoRA arms load the same folder with bitsandbytes)."""
    if not (model_folder(shape, seq) / "tokenizer_config.json").exists():
        saver = subprocess.run(
            [sys.executable, script, "--save-model", "--shape", shape, "--seq", str(seq)],
            capture_output=True,
            text=True,
        )
        if saver.returncode:
            sys.stderr.write(saver.stderr)
            cause = [line for line in saver.stderr.splitlines() if line.strip()][-1:] or [
                f"exit code {saver.returncode}"
            ]
            raise RuntimeError(f"saving the random-init {shape} model failed: {cause[0]}")
    return model_folder(shape, seq)


def build(shape: str, gc: bool, seq: int, targets: list[str], bits: int | None = None, dropout: float = 0.0):
    """Unsloth's loader and LoRA as its users call them (its defaults otherwise), `--gc on` as its
    offloaded checkpointing, QLoRA (`bits` 4, or UNSLOTH_4BIT=1) as its `load_in_4bit` (bitsandbytes
    nf4, double quantisation), `bits` 8 as its `load_in_8bit`; counted as train_throughput's `build` counts:
    frozen = every nn.Linear of the loaded model (lm_head included), LoRA = what trains."""
    import torch
    from unsloth import FastLanguageModel

    checkpointing = "unsloth" if gc else False
    four_bit = bits == 4 or os.environ.get("UNSLOTH_4BIT") == "1"
    model, _ = FastLanguageModel.from_pretrained(
        str(model_folder(shape, seq)),
        max_seq_length=seq,
        dtype=torch.bfloat16,
        load_in_4bit=four_bit,
        load_in_8bit=bits == 8,
        use_gradient_checkpointing=checkpointing,
    )
    n_frozen = linear_numel(model)
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,  # inside its fused LoRA since 2026.10 (UNSLOTH_FUSED_LORA_DROPOUT, on by default)
        bias="none",
        target_modules=targets,
        use_gradient_checkpointing=checkpointing,
        random_state=0,
    )
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = ", nf4 base" if four_bit else ", int8 base" if bits == 8 else ""
    mode = f"unsloth {'offloaded gc' if gc else 'no gc'}{base}"
    return model.train(), model.config, n_frozen, n_lora, [mode]


def one_row(batch: dict) -> dict:
    """Unsloth's padding-free layout of a packed step: its rows end to end, plus the sample lengths
    (CPU int32, as its collator makes them) that its attention splits on."""
    import torch

    pos = batch["position_ids"].reshape(1, -1)
    starts = (pos[0] == 0).nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([pos.shape[1]]))
    return dict(
        input_ids=batch["input_ids"].reshape(1, -1),
        position_ids=pos,
        labels=batch["labels"].reshape(1, -1),
        packed_seq_lengths=lengths.to(torch.int32),
    )


def linear_numel(model: Any) -> int:
    """Weights of every nn.Linear (lm_head included), a 4-bit one counted by its dense shape."""
    import torch

    from ftw_kernels.qlora import is_4bit

    return sum(
        m.weight.quant_state.shape.numel() if is_4bit(m.weight) else m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )

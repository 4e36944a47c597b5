"""The job's kernels compiled while its data is prepared: the kernel warm-up child.

A job's first step compiles every kernel it runs that the compile caches do not hold yet (Triton's and
Inductor's, on the volume: worker/job/children.compile_cache_env), one after another: a quarter of a fresh worker's
time to first step on an H200 for ftw's Triton kernels, and most of it under `torch_compile` — paid after
preprocessing, on the GPU-seconds the user buys. This child runs beside the preprocess stage and the base
model's download and the train stage's model loading (worker/job/warmup.py starts it; the train child, before its
first step, waits it out while it records or compiles side by side and stops it otherwise:
worker/train/warmup_lock.py). It builds the job's model with one decoder layer and random weights (the model's config
alone: no weights are downloaded or read), 4-bit as `load_in_4bit` loads it, with the job's adapter and kernels as the
train stage puts them on, compiled as `torch_compile` asks. On a GPU (Triton's JIT kernels) a forward and backward on
micro-batches of the job's shape records the kernels without compiling them, worker processes compile them side by
side (ftw_kernels.precompile), and a second pass compiles what the recording missed; under `torch_compile` one pass
compiles as it goes. What it compiles lands in the caches the train stage then reads; what it has not finished when
it is stopped, the train stage compiles as before. Nothing it does can fail the job: its exit code and output go to
logs/warmup.log.

    python -m worker.train.warmup RUN_DIR/config.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

import torch

from ftw_kernels import precompile
from schemas.config import TrainingConfig
from worker.data.tokenizer import load_tokenizer
from worker.train import warmup_lock
from worker.train.adapters import attach
from worker.train.batches import collate, host_inputs, to_device
from worker.train.model import (
    apply_kernel_patches,
    compile_if_asked,
    model_config,
    prepare_for_training,
    resolve_precision,
)


def one_layer(config):
    """A copy of a transformers model config with one decoder layer (per-layer lists cut to match)."""
    layers = config.num_hidden_layers
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == layers > 1:  # layer_types and the like
            setattr(small, key, value[:1])
    return small


def quantise_linears(model: torch.nn.Module, quant_type: str, double_quant: bool, storage: torch.dtype) -> None:
    """Every Linear but the output layer as a bitsandbytes Linear4bit (what `load_in_4bit` loads: the output layer
    stays in `storage`'s dtype), quantised on the Linear's device."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=storage,
                quant_type=quant_type,
                compress_statistics=double_quant,
                quant_storage=storage,
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                quant_type=quant_type,
                compress_statistics=double_quant,
                quant_storage=storage,
            )
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(child.weight.device))  # .to quantises
    model.is_loaded_in_4bit = True  # PEFT then wraps them in its bitsandbytes LoRA layers


def build(cfg: TrainingConfig, device: torch.device):
    """The job's model as the train stage builds it (worker/train/trainer.Trainer.setup), one layer deep: the model,
    its tokenizer, its precision and the kernels applied."""
    from transformers import AutoModelForCausalLM

    precision = resolve_precision(cfg, device)
    tokenizer = load_tokenizer(cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            one_layer(model_config(cfg)),
            dtype=precision.load_dtype,
            attn_implementation=cfg.attention_backend(),
            trust_remote_code=cfg.trust_remote_code,
        )
    if cfg.load_in_4bit:
        quantise_linears(model, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, precision.load_dtype)
    elif cfg.load_in_8bit:  # its weights dequantise by a torch op: the Triton kernels are those of a bf16 base
        cfg = cfg.model_copy(update={"load_in_8bit": False, "adapter": "lora"})
    prepare_for_training(cfg, model, tokenizer)
    model = attach(model, cfg)
    kernels = apply_kernel_patches(model, cfg)
    model.train()
    compile_if_asked(model, cfg, device)
    return model, tokenizer, precision, kernels


def batches(cfg: TrainingConfig, tokenizer) -> list[dict]:
    """Micro-batches of the job's shape on the host: one packed row of micro_batch_size × sequence_len tokens
    holding two samples of unequal lengths, as packing makes them (sample_packing), or micro_batch_size rows
    of up to sequence_len tokens, padded; then the same one token shorter. Triton compiles a kernel once per
    kind of integer argument (a multiple of 16 or not), and a job's token counts vary from step to step:
    both kinds are then in the cache."""
    mbs, _ = cfg.batch_shape()
    full = cfg.sequence_len * (mbs if cfg.sample_packing else 1)
    out = []
    for width in (full, full - 1):
        ids = [(7 * i) % max(len(tokenizer) - 1, 1) + 1 for i in range(width)]
        if cfg.sample_packing:
            first = 2 * width // 3
            rows = [{"input_ids": ids, "labels": ids, "position_ids": [*range(first), *range(width - first)]}]
        else:  # the first row full, the others shorter
            lengths = [width] + [max(1, width * 2 // 3)] * (mbs - 1)
            rows = [{"input_ids": ids[:n], "labels": ids[:n], "position_ids": list(range(n))} for n in lengths]
        out.append(collate(rows, tokenizer.pad_token_id or 0, packed=cfg.sample_packing))
    return out


def passes(model, micro_batches: list[dict], precision, device: torch.device) -> None:
    """A forward and backward per micro-batch, as the trainer runs them."""
    for micro in micro_batches:
        with precision.autocast(device.type):
            loss = model(**to_device(micro, device), use_cache=False).loss
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def warm(cfg: TrainingConfig, device: torch.device, hold: warmup_lock.Hold) -> str:
    """The job's kernels compiled: on a GPU without `torch_compile`, a pass records them, worker processes compile
    them side by side (ftw_kernels.precompile), and a pass compiles what the recording missed; otherwise one pass
    compiles each as it first runs (Inductor's under `torch_compile`). What it did, in a line."""
    model, tokenizer, precision, kernels = build(cfg, device)
    micro_batches = batches(cfg, tokenizer)
    for micro in micro_batches:  # what the trainer's prefetcher hands over: the varlen boundaries, the loss head's rows
        micro.update(host_inputs(micro, "varlen_attention" in kernels, "fused_linear_cross_entropy" in kernels))
    side_by_side = ""
    if records_kernels(cfg, device):
        hold.phase(warmup_lock.RECORDING)  # from here on the train child waits for it: its model is built
        started = time.monotonic()
        with precompile.recording() as recorded:
            try:
                passes(model, micro_batches, precision, device)
            except Exception as e:  # a kernel's meaningless output met a check: what was recorded still compiles
                print(f"the recording pass stopped early: {type(e).__name__}: {str(e)[:200]}", flush=True)
        recorded_s = time.monotonic() - started
        hold.phase(warmup_lock.SIDE_BY_SIDE)
        done = precompile.compile_side_by_side(recorded, precompile.available_workers())
        for failure in done.failed:
            print(f"not compiled ahead (its first launch compiles it): {failure}", flush=True)
        side_by_side = (
            f"recorded {done.kernels} kernels in {recorded_s:.1f} s ({done.cached} in the cache already), compiled "
            f"them in {done.workers} processes in {done.seconds:.1f} s; "
        )
    hold.phase(warmup_lock.COMPILING)
    started = time.monotonic()
    with precompile.counted() as counts:
        passes(model, micro_batches, precision, device)
    took = f"its pass {time.monotonic() - started:.1f} s"
    if side_by_side:  # what the recording missed compiled in the pass; Inductor's compiles are not Triton JIT's
        took += f" ({counts['compiled']} kernels compiled in it, {counts['from_cache']} read from the cache)"
    return side_by_side + took


def records_kernels(cfg: TrainingConfig, device: torch.device) -> bool:
    """Whether the warm-up records its kernels and compiles them side by side: Triton's JIT kernels on a GPU. Under
    `torch_compile` Inductor compiles its own (and the trace would meet the recording's meaningless outputs)."""
    return device.type == "cuda" and not cfg.compiles_model(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.train.warmup", description=__doc__.splitlines()[0])
    parser.add_argument("config_json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started, cached = time.monotonic(), cache_files()
    try:
        cfg = TrainingConfig.model_validate_json(args.config_json.read_text())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with warmup_lock.holding(args.config_json.parent) as hold:  # the run's: the train child reads its phase
            what = warm(cfg, device, hold)
    except Exception as e:  # the train stage meets the same problem and reports it in full
        print(f"kernel warm-up failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return 1
    took, added = time.monotonic() - started, cache_files() - cached
    print(f"kernel warm-up done in {took:.1f} s ({what}; {added} new files in the caches)", flush=True)
    return 0


def cache_files() -> int:
    """Files in the compile caches this process writes to (Triton's, Inductor's)."""
    roots = [os.environ.get(key) for key in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")]
    return sum(1 for root in roots if root and Path(root).is_dir() for p in Path(root).rglob("*") if p.is_file())


if __name__ == "__main__":
    sys.exit(main())

"""LoRA training throughput on one GPU: ftw's kernels against transformers+peft, Liger and Unsloth.

    python bench/train_throughput.py                       # all shapes, arms hf, liger, unsloth, ftw
    bash bench/gpu_peers.sh --shapes llama-8b --gc both    # the same on the GPU machine, peer wheels installed
    python bench/train_throughput.py --shapes llama-1b --arms hf,ftw --steps 30 --json OUT.json
    python bench/train_throughput.py --loss-curve 200 --shapes llama-1b   # kernels on vs off
    python bench/train_throughput.py --loss-curve 200 --shapes llama-1b --arms ftw,ftw-fp8   # each against hf
      (with hf run again on the same seed: bf16's nondeterminism, and on another LoRA seed: a rerun's spread)

Every arm runs in its own process (Liger patches transformers classes process-wide) on the same
token stream: samples of lognormal length (mean ~600, capped at 2048) packed back to back into
rows of `--seq` tokens (position ids restart at each sample; the cross-sample target is masked),
`--mbs` rows a step, so every step holds the same number of real tokens. Random-init models of the
public shapes, bf16, LoRA r=16 α=32 on all seven linear layers, fused AdamW. Timing: CUDA events
over `--steps` steps after `--warmup`. MFU counts useful FLOPs only,
4·N_frozen + 6·N_lora + 6·L·d_attn·Σsᵢ²/T per token (packed attention costs Σsᵢ², not S²; the output head's
4·V·d over the tokens that have a target only),
against the bf16 matmul peak measured at the start of the same run.
Arms: hf = transformers+peft, sdpa (transformers splits packed rows with a block mask); liger = hf + Liger Kernel
(when importable); ftw = hf + `ftw_kernels.apply_kernels` (the call the trainer makes after get_peft_model); ftw-fp8
= ftw with `fp8_base_weights: true` (the frozen Linears in float8, `torch._scaled_mm`; its MFU still counts against
the bf16 peak); ftw-unbordered = ftw with `FTW_BORDERED_LORA=0` (the fused q, k, v and gate, up without the bordered
weights ftw lays out by default, kernels/ftw_kernels/bordered.py; e.g. `--arms ftw,ftw-unbordered`; with `--4bit`
the JSON's `dequantised` counts a step's 4-bit dequantisations, kernels/ftw_kernels/qlora.py); ftw-all-rows = ftw
with every row of the batch to the loss head, not only the target rows the trainer's prefetcher lists
(`--prompt-share 0.5`: half of each sample a masked prompt); ftw-peft-lora = ftw's kernels with PEFT's LoRA layers
(lora_qkv/o/mlp_kernel off: what a LoRA with `--lora-dropout` ran before the fused kernels took dropout, and what
DoRA still runs); ftw-padded = ftw on `--unpacked` micro-batches kept as
padded rows, where ftw joins each one's samples into one row as its trainer's padding-free batches do (tokens/s
counts real tokens in every arm); unsloth = Unsloth's FastLanguageModel and LoRA on the same seed-0 weights, its
offloaded checkpointing for `--gc on`, packed steps in its padding-free layout (bench/unsloth_arm.py). The table
gives tokens/s and peak memory also as ratios to hf's and Unsloth's. `--offload`: the ftw arm's forward runs under
worker/train/offload.py's activation offloading (what `gradient_checkpointing: offload` does in training), shown as
arm ftw+offload; e.g. `--shapes llama-8b --arms ftw --gc on --offload`. Peer wheels (Liger, Unsloth):
`bench/gpu_peers.sh`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
from bench.arm_runs import arm_args, child, finish_child, start_child  # noqa: E402
from bench.models import (  # noqa: E402
    DEFAULT_MBS,
    TARGETS,
    UNFUSED_LORA,
    flattened,
    matmul_peak_tflops,
    packed_batches,
    padded_batches,
)
from bench.models import PUBLIC_SHAPES as SHAPES  # noqa: E402
from bench.nf4_arms import dequantised  # noqa: E402
from bench.step_probes import profile_steps, sync_sites  # noqa: E402
from bench.throughput_table import table  # noqa: E402

FTW_ARMS = ("ftw", "ftw-fp8", "ftw-unbordered", "ftw-all-rows", "ftw-padded", "ftw-peft-lora")  # ftw's kernels
ARM_SWITCHES = {"ftw-unbordered": ("FTW_BORDERED_LORA", "0")}  # ftw's names


# ---- one arm (child process) --------------------------------------------------------------------
def model_config(shape: str, seq: int):
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    return AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=max(seq, 4096), **spec)


def build(arm: str, shape: str, gc: bool, seq: int, bits: int | None = None, lora_seed: int | None = None, dropout=0.0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if arm == "unsloth":
        from bench import unsloth_arm

        return unsloth_arm.build(shape, gc, seq, TARGETS, bits, dropout)
    if bits:  # over a bitsandbytes base: PEFT's recipe (hf) or ftw's (ftw) over the nf4 or int8 weights
        from bench import nf4_arms

        return nf4_arms.build(arm, shape, gc, seq, TARGETS, bits)
    from schemas.config import TrainingConfig
    from worker.train.model import checkpointing_kwargs

    cfg = model_config(shape, seq)
    if arm == "liger":
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{cfg.model_type}")()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    n_frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    ftw_cfg = TrainingConfig(
        base_model=shape,
        learning_rate=1e-4,
        adapter="lora",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        gradient_checkpointing=gc,
        fp8_base_weights=arm == "ftw-fp8",
        **(dict.fromkeys(UNFUSED_LORA, False) if arm == "ftw-peft-lora" else {}),
    )
    if gc:  # the kind ftw's trainer would choose for this run
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(ftw_cfg, model))
        model.enable_input_require_grads()
    if lora_seed is not None:  # the same base weights, another draw of the LoRA A's
        torch.manual_seed(lora_seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS))
    applied: list[str] = []
    if arm in FTW_ARMS:
        from ftw_kernels import apply_kernels

        applied = apply_kernels(model, ftw_cfg)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model.train(), cfg, n_frozen, n_lora, applied


def run_arm(a: argparse.Namespace) -> dict:
    from bench import unsloth_arm

    if a.arm == "unsloth":  # before torch and transformers: see bench/unsloth_arm.py
        unsloth_arm.prepare(__file__, a.shape, a.seq)
    elif a.bits:  # the quantised arms load the folder Unsloth loads
        unsloth_arm.save_once(__file__, a.shape, a.seq)
    import torch

    if a.arm in ARM_SWITCHES:  # this arm's own process: the switch reaches no other arm
        os.environ.__setitem__(*ARM_SWITCHES[a.arm])
    peak = matmul_peak_tflops()
    model, cfg, n_frozen, n_lora, applied = build(a.arm, a.shape, a.gc, a.seq, a.bits, a.lora_seed, a.lora_dropout)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, fused=True)
    # without --replay the profiled steps are three batches of their own, met first under the profiler, as the timed
    # steps met theirs; with it, three of the timed batches, met before
    fresh_profile = 3 if a.profile and not a.replay else 0
    total = a.warmup + a.steps + fresh_profile
    # Unsloth's packed steps in its padding-free layout; its unpacked ones padded (its padding-free attention wants
    # flash-attn, which the device image lacks: docs/benchmarks.md, the packed rows of 2026-12-02)
    layout = unsloth_arm.one_row if a.arm == "unsloth" and not (a.full_length or a.unpacked) else dict
    if a.arm in FTW_ARMS:  # what the trainer's prefetcher hands over: varlen boundaries, the loss head's rows
        from worker.train.batches import host_inputs

        rows = "fused_linear_cross_entropy" in applied and a.arm != "ftw-all-rows"
        flat = a.unpacked and a.arm != "ftw-padded"  # the trainer's padding-free batches

        def layout(b):
            b = flattened(b) if flat else b
            return {**b, **host_inputs(b, "varlen_attention" in applied, rows)}

    if a.unpacked:
        stream = list(padded_batches(total, a.mbs, a.seq, cfg.vocab_size, 0, a.prompt_share))
    else:
        stream = list(packed_batches(total, a.mbs, a.seq, cfg.vocab_size, 0, a.full_length, a.prompt_share))
    batches = [
        (
            {
                k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) and k != "packed_seq_lengths" else v
                for k, v in layout(b).items()
            },
            sq,
        )
        for b, sq in stream
    ]
    losses: list[float] = []
    offloader = None
    if a.offload and a.arm in FTW_ARMS:
        from worker.train.offload import ActivationOffloader

        offloader = ActivationOffloader(torch.device("cuda"))

    host_s = dict(forward=0.0, backward=0.0, optimizer=0.0)  # the host's time per phase (launches, no sync)

    def step(batch):
        t0 = time.perf_counter()
        with offloader.saving() if offloader else contextlib.nullcontext():
            loss = model(**batch, use_cache=False).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for phase, seconds in zip(host_s, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            host_s[phase] += seconds
        return loss.detach()

    heap_frozen = a.arm.startswith("ftw") or a.freeze_heap == "all"
    if heap_frozen:  # as ftw's trainer does before its loop
        from worker.train.step_queue import freeze_heap

        freeze_heap()
    from worker.train.gpu_clocks import GpuClocks, gpu_id

    torch.cuda.reset_peak_memory_stats()
    # --replay: the timed steps' batches once untimed first, so every shape they bring is compiled and planned
    timed = batches[a.warmup : a.warmup + a.steps]
    for b, _ in batches[: a.warmup] + (timed if a.replay else []):
        losses.append(step(b))
    host_s.update(dict.fromkeys(host_s, 0.0))
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(a.steps + 1)]  # before each step, after the last
    clocks = GpuClocks(gpu_id(torch.cuda.current_device()), period_ms=200)  # the SM clock under the power cap
    clocks.start()
    marks[0].record()
    for (b, _), mark in zip(timed, marks[1:]):
        losses.append(step(b))
        mark.record()
    torch.cuda.synchronize()
    timed_host_s = dict(host_s)  # before the probes below run more steps through `step`
    clocks.stop()
    clock = clocks.summary()
    each_ms = [before.elapsed_time(after) for before, after in zip(marks, marks[1:])]
    seconds = sum(each_ms) / 1e3
    # the steps' own dequantisations, before the probes below run more steps
    dequantised_a_step = dequantised(a.warmup + a.steps) if a.bits and a.arm in FTW_ARMS else None
    syncs = sync_sites(step, timed[-1][0])
    profiled = batches[a.warmup + a.steps :] if fresh_profile else timed[:3]
    busy_ms = profile_steps(step, profiled, a.profile) if a.profile else None
    timed_stream = stream[a.warmup : a.warmup + a.steps]
    tokens_each = [int(b.get("attention_mask", b["input_ids"]).bool().sum()) for b, _ in timed_stream]  # real
    tokens = sum(tokens_each)
    sum_sq = sum(sq for _, sq in timed)
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in timed_stream)  # the head's useful rows
    head = cfg.vocab_size * cfg.hidden_size
    flops = 4 * (n_frozen - head) * tokens + 4 * head * targets + 6 * n_lora * tokens
    flops += 6 * cfg.num_hidden_layers * d_attn * sum_sq
    return dict(
        arm=a.arm + ("+offload" if offloader else ""),
        shape=a.shape,
        mbs=a.mbs,
        seq=a.seq,
        gc=a.gc,
        bits=a.bits,
        full_length=a.full_length,
        unpacked=a.unpacked,
        replay=a.replay,
        steps=a.steps,
        tokens_per_s=round(tokens / seconds),
        mfu=round(flops / seconds / (peak * 1e12), 4),
        peak_tflops=round(peak, 1),
        peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
        loss_first=round(float(losses[0]), 4),
        loss_last=round(float(losses[-1]), 4),
        losses=[round(float(x), 5) for x in losses] if a.keep_losses else None,
        kernels=applied,
        offloaded_mib_per_step=round(offloader.last.offloaded_bytes / 2**20, 1) if offloader else None,
        step_ms=round(seconds * 1e3 / a.steps, 1),
        step_ms_each=[round(ms, 1) for ms in each_ms],
        step_tokens_each=tokens_each,
        heap_frozen=heap_frozen,
        host_ms_per_step={phase: round(s * 1e3 / a.steps, 1) for phase, s in timed_host_s.items()},
        host_syncs=syncs,
        dequantised=dequantised_a_step,
        gpu_busy_ms_per_step=None if busy_ms is None else round(busy_ms, 1),
        sm_mhz=clock.get("gpu_sm_clock_mhz"),
        gpu_busy_share=clock.get("gpu_busy_share"),
        power_w=clock.get("gpu_power_w"),
    )


# ---- the parent: one process per arm, then the table --------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-1b,llama-8b,qwen-7b")
    ap.add_argument(
        "--arms",
        default="hf,liger,unsloth,ftw",
        help="any of hf, liger, unsloth, ftw, ftw-fp8, ftw-unbordered, ftw-all-rows, ftw-padded, ftw-peft-lora",
    )
    ap.add_argument(
        "--lora-dropout", type=float, default=0.0, help="every arm's lora_dropout (axolotl's examples: 0.05)"
    )
    ap.add_argument("--gc", default="off", help="off, on, or both")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=0, help="rows per step (default: 8 for 1B, 4 for 7-8B)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--full-length", action="store_true", help="one sample per row (no packing)")
    ap.add_argument("--unpacked", action="store_true", help="--mbs samples a step, one a row, padded to the longest")
    ap.add_argument("--prompt-share", type=float, default=0.0, help="each sample's masked prompt share (labels -100)")
    ap.add_argument(
        "--replay",
        action="store_true",
        help="warm up on the timed batches too (one untimed pass over them first): with --unpacked every step's "
        "padded length is new, and the first step of each shape pays its kernels' compiles and plans",
    )
    ap.add_argument(
        "--4bit",
        dest="four_bit",
        action="store_true",
        help="QLoRA: every arm over a bitsandbytes nf4 base (bench/qlora.py runs the side-by-side)",
    )
    ap.add_argument("--8bit", dest="eight_bit", action="store_true", help="every arm over a bitsandbytes int8 base")
    ap.add_argument("--offload", action="store_true", help="ftw arm: activation offloading to host memory")
    ap.add_argument(
        "--loss-curve",
        type=int,
        default=0,
        help="instead: N steps of hf, hf again, hf with another LoRA seed and each ftw arm of --arms (default ftw), "
        "concurrently; compare losses",
    )
    ap.add_argument(
        "--freeze-heap",
        choices=("ftw", "all"),
        default="ftw",
        help="which arms freeze the Python heap before their steps: the ftw arms, as ftw's trainer does (the "
        "peers run as their users run them), or all, to show what the collector costs each peer here",
    )
    ap.add_argument("--json", help="write all results here")
    ap.add_argument(
        "--arm-timeout",
        type=float,
        default=0,
        help="seconds an arm may take (load included) before it is killed and shown as an error row",
    )
    ap.add_argument(
        "--profile",
        help=(
            "profile the ftw arm (3 steps): write its kernel table to PATH-<shape>-gc<on|off>.txt "
            "(Unsloth's to PATH-<shape>-gc<on|off>-unsloth.txt), the host's Python functions to that path + .host.txt"
        ),
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--keep-losses", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lora-seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--save-model", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-to", dest="profile_to", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.bits = 4 if a.four_bit else 8 if a.eight_bit else None
    if a.save_model:
        from bench import unsloth_arm

        unsloth_arm.save_random_init(model_config(a.shape, a.seq), unsloth_arm.model_folder(a.shape, a.seq))
        return
    if a.child:
        a.gc = a.gc == "on"
        a.profile = a.profile_to
        print("RESULT " + json.dumps(run_arm(a)), flush=True)
        return
    results = []
    if a.loss_curve:
        from bench.loss_curve import compare_losses

        results = compare_losses(a, start_child, finish_child)
    else:
        for shape in a.shapes.split(","):
            for gc in ["off", "on"] if a.gc == "both" else [a.gc]:
                for arm in a.arms.split(","):
                    prof = (
                        ["--profile-to", f"{a.profile}-{shape}-gc{gc}{'' if arm == 'ftw' else '-' + arm}.txt"]
                        if a.profile and arm in (*FTW_ARMS, "unsloth")
                        else []
                    )
                    r = child(
                        [
                            *arm_args(arm, shape, gc, a.mbs or DEFAULT_MBS[shape], a.seq, a.steps, a.warmup),
                            "--lr",
                            str(a.lr),
                            "--freeze-heap",
                            a.freeze_heap,
                            *prof,
                            *(["--full-length"] if a.full_length else []),
                            *(["--unpacked"] if a.unpacked else []),
                            *(["--prompt-share", str(a.prompt_share)] if a.prompt_share else []),
                            *(["--replay"] if a.replay else []),
                            *(["--4bit"] if a.four_bit else ["--8bit"] if a.eight_bit else []),
                            *(["--offload"] if a.offload and arm in FTW_ARMS else []),
                            *(["--lora-dropout", str(a.lora_dropout)] if a.lora_dropout else []),
                        ],
                        timeout=a.arm_timeout or None,
                    )
                    print(json.dumps(r), flush=True)
                    results.append(r)
        print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""`ftw estimate CONFIG_OR_JOB [--gpu NAME] [--json] [--tokens N]` — before paying for a run: on
each of RunPod's serverless GPU types, the predicted peak memory, tokens/s, whole-run time and cost,
whether it fits, the cheapest type that fits, and what to change where it does not.

    ftw estimate config.yml                        # a table over every GPU type, then advice
    ftw estimate job.json --gpu "NVIDIA L4"        # one type (as RunPod spells it)
    ftw estimate config.yml --json                 # {"gpus": [{name, memory_gib, fits, peak_memory_gib,
                                                   #   tokens_per_s, time_s, cost_usd}, ...], "cheapest": NAME}
CPU only, no weights downloaded: the model's shape comes from its local config.json or ftw's table of
common models (docs/estimate.md). An estimate (whether or not it fits), a usage error (unreadable
file, unknown GPU type, unknown model shape), or an invalid config or job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from worker.documents import looks_like_job, read_document, validate_document
from worker.errors import Outcome
from worker.estimate.gpus import GpuType, gpu_table
from worker.estimate.model import GiB
from worker.estimate.report import Estimate, advice, estimate
from worker.estimate.shapes import UnknownShape, local_model_shape


def estimate_file(path: Path, gpu: str | None, as_json: bool, tokens: int | None, shape_from: Path | None) -> Outcome:
    doc, readable = read_document(path, "ftw estimate")
    if not readable:
        return "usage"
    cfg = config_of(doc)
    if cfg is None:
        return "invalid"
    shape = None
    if shape_from:
        shape = local_model_shape(shape_from) if shape_from.is_dir() else None
        if shape is None or not shape.layers:
            print(f"ftw estimate: {shape_from} holds no config.json with the model's dimensions", file=sys.stderr)
            return "usage"
    try:
        est = estimate(cfg, dict(os.environ), gpu, shape, tokens)
    except (UnknownShape, ValueError) as e:
        print(f"ftw estimate: {e}", file=sys.stderr)
        return "usage"
    print(json.dumps(est.as_json()) if as_json else render(est, gpu))
    return "ok"


def estimate_text(job_input: Any, env: dict[str, str]) -> tuple[str, str | None]:
    """(the rendered estimate, None) for a job's config, or ("", why not)."""
    from schemas.job import validate_job

    report = validate_job(job_input, env=env)  # the config as the worker will run it (operator defaults too)
    if not report.valid:
        return "", f"invalid job: {report.errors[0]}"
    try:
        return render(estimate(report.value.config, env), None), None
    except (UnknownShape, ValueError) as e:
        return "", str(e)


def config_of(doc: Any):
    """The TrainingConfig of a config or job document; None after printing why it is invalid."""
    report = validate_document(doc)
    if not report.valid:
        for issue in report.errors:
            print(f"error {issue}", file=sys.stderr)
        print("ftw estimate: the config is invalid (the same errors as `ftw validate`)", file=sys.stderr)
        return None
    return report.value.config if looks_like_job(doc) else report.value


# ---- text --------------------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes = round(seconds / 60)
    if minutes < 2:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def describe(est: Estimate) -> list[str]:
    w, s = est.workload, est.workload.shape
    layout = "packed" if w.packed else "one row of its samples (padding-free)" if w.padding_free else "one sample a row"
    ckpt = (
        "checkpointing with offload"
        if w.checkpointing and w.offload
        else "checkpointing"
        if w.checkpointing
        else "no checkpointing"
    )
    lines = [
        f"model: {s.source} — {s.params / 1e9:.2f}B parameters, {s.layers} layers × {s.hidden} wide",
        f"run: {w.method}, {w.micro_batch_size} × {w.sequence_len} tokens {layout}, "
        f"{w.grad_accum} micro-batch(es) a step, {ckpt}, "
        f"kernels {'on' if w.kernels else 'off'}"
        + (" (full fine-tuning: not calibrated)" if w.method == "full" else "")
        + (", LoRA off the fused kernels (PEFT's layers: not calibrated)" if w.mode == "peft_lora" else ""),
    ]
    data = f"{est.data.tokens:,} tokens ({est.data.source})" if est.data.tokens else f"size unknown ({est.data.source})"
    if w.trained_share is not None:
        data += f", {w.trained_share:.0%} of them trained"
        data += " (the loss head computes only those)" if w.kernels else ""
    lines.append(f"data: {data}; {est.steps:,} optimizer steps" if est.steps else f"data: {data}")
    lines.append(
        f"startup (imports, model load{', preprocessing' if 'cache' not in est.data.source else ''}): "
        f"about {duration(est.startup_s)}"
    )
    return lines


def render(est: Estimate, gpu_name: str | None) -> str:
    table = gpu_table()
    lines = describe(est) + [""]
    head = f"{'GPU':<32} {'memory':>8} {'$/h':>6} {'peak':>9} {'fits':>4} {'tokens/s':>9} {'time':>12} {'cost':>9}"
    lines += [head, "-" * len(head)]
    for r in est.rows:
        cost = "—" if r.cost_usd is None else f"${r.cost_usd:,.2f}"
        lines.append(
            f"{r.gpu.name:<32} {r.gpu.memory_gib:>5.0f} GiB {r.gpu.usd_per_s * 3600:>6.2f} "
            f"{r.peak_bytes / GiB:>5.1f} GiB "
            f"{'yes' if r.fits else 'no':>4} {r.tokens_per_s:>9,.0f} {duration(r.time_s):>12} {cost:>9}"
        )
    cheapest = est.cheapest
    lines.append("")
    if cheapest:
        cost = "" if cheapest.cost_usd is None else f": {duration(cheapest.time_s)}, ${cheapest.cost_usd:,.2f}"
        lines.append(f"cheapest that fits: {cheapest.gpu.name}{cost}")
    else:
        lines.append(
            f"does not fit on {gpu_name} as configured" if gpu_name else "fits on none of these GPU types as configured"
        )
    target = advice_target(est, gpu_name)
    if target is not None:
        lines.append(
            f"\nto fit on {target.gpu.name} ({target.gpu.memory_gib:.0f} GiB, ${target.gpu.usd_per_s * 3600:.2f}/h), "
            f"predicted peak {target.peak_bytes / GiB:.1f} GiB:"
        )
        lines += advice_lines(est, target.gpu)
    lines += [f"note: {n}" for n in est.notes]
    lines.append(f"prices: {table.source}, read {table.read_on}; the model and its error: docs/estimate.md")
    return "\n".join(lines)


def advice_lines(est: Estimate, gpu: GpuType) -> list[str]:
    lines = []
    for a in advice(est.workload, gpu.memory_gib * GiB, gpu.bf16_tflops):
        seconds, cost = est.time_and_cost(a.workload, gpu)
        run = "" if cost is None or not a.fits else f": {duration(seconds)}, ${cost:,.2f}"
        lines.append(
            f"  {a.change}: peak {a.peak_bytes / GiB:.1f} GiB ({'fits' if a.fits else 'does not fit'}), "
            f"{a.speed_ratio:.2f}× the tokens/s{run}"
        )
    return lines


def advice_target(est: Estimate, gpu_name: str | None):
    """Where advice helps: the asked type; else the largest type cheaper than the cheapest fit (or
    the largest of all when none fits)."""
    misses = [r for r in est.rows if not r.fits]
    if not misses:
        return None
    if gpu_name:
        return misses[0]
    cheapest = est.cheapest
    cheaper = [r for r in misses if cheapest is None or r.gpu.usd_per_s < cheapest.gpu.usd_per_s]
    return max(cheaper, key=lambda r: (r.gpu.memory_gib, -r.gpu.usd_per_s)) if cheaper else None

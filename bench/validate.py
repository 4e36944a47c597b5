"""How long validation takes: `ftw validate` as a process, and validate_job inside a running process.

    .venv/bin/python bench/validate.py [--runs 30] [--inproc-runs 300] [--hostile-runs 5]

A second table times the front door of a job (parse the bytes, validate, redact the report and the
job as the orchestrator writes them) for 10 MB hostile jobs, as a ratio to a typical 10 KB job:
a linear front door stays well under the size ratio (1000×); a quadratic one would be ~10⁶×.

Prints a markdown table of medians (and p90) with the targets (process < 0.5 s, in-process
< 20 ms), next to baselines measured in the same run: a bare interpreter and an interpreter
that imports pydantic and yaml and builds a one-field model (what any pydantic CLI pays). For processes it
also gives the CPU time of the child (user + system), which a machine shared with other work
inflates much less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FTW = REPO / ".venv" / "bin" / "ftw"
PYTHON = REPO / ".venv" / "bin" / "python"
CONFIG = {
    "base_model": "meta-llama/Llama-3.2-1B",
    "adapter": "qlora",
    "load_in_4bit": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_linear": True,
    "sequence_len": 2048,
    "sample_packing": True,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "num_epochs": 1,
    "learning_rate": 2e-4,
    "optimizer": "adamw_torch_fused",
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.05,
    "bf16": "auto",
    "gradient_checkpointing": True,
    "flash_attention": True,
    "chat_template": "llama3",
    "val_set_size": 0.05,
    "saves_per_epoch": 2,
    "logging_steps": 1,
    "strict": False,
    "datasets": [
        {
            "path": "org/chat-data",
            "type": "chat_template",
            "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
            "roles_to_train": ["assistant"],
        },
        {"path": "org/alpaca-data", "type": "alpaca", "split": "train[:90%]"},
    ],
}
JOB = {
    "input": {
        "run_id": "bench-run-1",
        "args": CONFIG,
        "outputs": {"s3": {"bucket": "my-bucket", "prefix": "runs"}, "hub": {"repo_id": "me/adapter"}},
        "credentials": {"hf_token": "hf_xxxxxxxxxxxxxxxx"},
    }
}


# what any pydantic + yaml CLI pays before its own work: the imports and building one model
PYDANTIC_FLOOR = "import yaml\nfrom pydantic import BaseModel\nclass A(BaseModel):\n    x: int = 1\nA(x=1)"


def timed_process(argv: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds and child CPU seconds of each launch."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "BASE_VOLUME": "/volume"})
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def timed_call(fn, runs: int) -> list[float]:
    fn()  # first call outside the measurement: the models are built on import, this warms caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_p90(times: list[float]) -> str:
    p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 10 else max(times)
    return f"{statistics.median(times) * 1000:.1f} ms | {p90 * 1000:.1f} ms"


def row(name: str, walls: list[float], cpus: list[float] | None, target_s: float, baseline: float | None) -> str:
    median = statistics.median(walls)
    ratio = "" if baseline is None else f"{median / baseline:.2f}×"
    cpu = "" if cpus is None else f"{statistics.median(cpus) * 1000:.1f} ms"
    met = "" if not target_s else ("yes" if median < target_s else "no")
    met_cpu = "" if not target_s or cpus is None else ("yes" if statistics.median(cpus) < target_s else "no")
    target = f"< {target_s * 1000:.0f} ms" if target_s else ""
    return f"| {name} | {median_p90(walls)} | {cpu} | {ratio} | {target} | {met} | {met_cpu} |"


TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
TEN_MB = 10_000_000  # under schemas.limits.MAX_DOCUMENT_BYTES (10 MiB)


def sized_job(config: dict, size: int) -> bytes:
    """JOB with `config` merged in, its one "@" placeholder padded so the document is `size` bytes."""
    text = json.dumps({"input": {**JOB["input"], "args": {**CONFIG, **config}}})
    return text.replace("@", "", 1).replace("PAD", "a" * (size - len(text) + 4), 1).encode()


def front_door(document: bytes) -> None:
    """What the orchestrator does with a job before any stage: parse, validate, redact what it writes."""
    from schemas.job import validate_job
    from schemas.limits import parse_json
    from schemas.secrets import Redactor

    env = {"BASE_VOLUME": "/volume"}
    report = validate_job(parse_json(document), env=env)
    redactor = Redactor.for_job(env, {})
    redactor.data(report.as_dict())
    if report.valid:
        redactor.data(report.value.public_dict())


def hostile_table(runs: int) -> None:
    typical = sized_job({"chat_template": "jinja", "chat_template_jinja": "{# @PAD #}" + TEMPLATE}, 10_000)
    jobs = [
        ("typical job, 10 KB (baseline)", typical),
        (
            "10 MB chat_template_jinja of letters (valid)",
            sized_job({"chat_template": "jinja", "chat_template_jinja": "{# @PAD #}" + TEMPLATE}, TEN_MB),
        ),
        (
            "10 MB datasets[0].type of letters (invalid)",
            sized_job({"datasets": [{"path": "org/d", "type": "@PAD"}]}, TEN_MB),
        ),
        ("10 MB base_model URL without '@' (invalid)", sized_job({"base_model": "https://@PAD"}, TEN_MB)),
    ]
    results = [(name, len(doc), timed_call(lambda doc=doc: front_door(doc), runs)) for name, doc in jobs]
    base = statistics.median(results[0][2])
    print(f"\njob front door (parse + validate + redact), median of {runs} calls\n")
    print("| job | bytes | median | × typical job | size × typical job |")
    print("|---|---|---|---|---|")
    for name, size, times in results:
        print(
            f"| {name} | {size:,} | {statistics.median(times) * 1000:.1f} ms "
            f"| {statistics.median(times) / base:.0f}× | {size / results[0][1]:.0f}× |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="process launches per row")
    parser.add_argument("--inproc-runs", type=int, default=300, help="calls per in-process row")
    parser.add_argument("--hostile-runs", type=int, default=5, help="calls per row of the 10 MB table")
    args = parser.parse_args()

    from schemas.job import validate_job
    from schemas.validate import validate_config

    env = {"BASE_VOLUME": "/volume"}
    assert validate_job(JOB, env=env).valid
    with tempfile.TemporaryDirectory() as tmp:
        config_path, job_path = Path(tmp, "config.yml"), Path(tmp, "job.json")
        import yaml

        config_path.write_text(yaml.safe_dump(CONFIG))
        job_path.write_text(json.dumps(JOB))
        bare = timed_process([str(PYTHON), "-c", "pass"], args.runs)
        libs = timed_process([str(PYTHON), "-c", PYDANTIC_FLOOR], args.runs)
        cli_config = timed_process([str(FTW), "validate", str(config_path)], args.runs)
        cli_job = timed_process([str(FTW), "validate", str(job_path), "--json"], args.runs)
    in_job = timed_call(lambda: validate_job(JOB, env=env), args.inproc_runs)
    in_config = timed_call(lambda: validate_config(CONFIG, env), args.inproc_runs)

    base = statistics.median(libs[0])
    print(
        f"validation timings ({args.runs} launches, {args.inproc_runs} in-process calls; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n"
    )
    print("| what | median wall | p90 wall | median CPU | wall × pydantic baseline | target | met (wall) | met (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("python -c pass (baseline)", *bare, 0, base))
    print(row("pydantic + yaml + one model (baseline)", *libs, 0, base))
    print(row("ftw validate config.yml (process)", *cli_config, 0.5, base))
    print(row("ftw validate job.json --json (process)", *cli_job, 0.5, base))
    print(row("validate_job(typical job), in-process", in_job, None, 0.020, None))
    print(row("validate_config(typical config), in-process", in_config, None, 0.020, None))
    hostile_table(args.hostile_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

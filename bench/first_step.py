"""Time to first step of the tiny job, against the import floor of one process, on this machine.

    python bench/first_step.py [--steps 3] [--repeat 1] [--config '{"torch_compile": true}'] [--rows 20000]

Rows (each a fresh worker process that runs the bundled example job twice through `run_job`, the
function handler.py and `ftw run` call; a job's `timings.first_step_s` is measured by the
orchestrator from the train child's first-step event; the columns after it say where it went):
  floor             `python -c "import torch, transformers, datasets, peft"`, wall time
  template, job 1   a fresh worker: the stage template starts with the job (imports once, forks
                    preprocess and train)
  template, job 2   the same worker's next job: the template is warm
  template, the volume used before, job 1
                    a fresh worker on a volume that an earlier worker used: its compiled
                    kernels (Triton's, Inductor's) are there (every other row starts without)
  fresh, job 1 / 2  FTW_STAGE_TEMPLATE=0: every stage a fresh interpreter (the old path)
Targets (issue 13): a fresh worker ≤ 1.3× the floor, a warm worker's next job ≤ 0.3× the floor.
The tiny model and data are built under --work (examples/demo_job.json's, max_steps --steps; --rows N: that many
chat rows in its dataset, for a preprocessing that takes seconds as a user's does). Every worker meets the data for
the first time: the volume's prepared datasets are removed before it starts (its job 2 reuses job 1's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = "import torch, transformers, datasets, peft"
# a job's timings, in the table's order: the time to first step, the stages before training, and
# the parts of the train stage up to its first step (worker/job/first_step.py), then the whole job
COLUMNS = ("first_step_s", "preprocess_s", "train_startup_s", "model_setup_s", "first_step_compute_s", "total_s")


def median(values: list) -> float | None:
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def worker(volume: Path, steps: int, config: dict) -> None:
    """One worker process: two jobs, one after the other, as a warm serverless worker takes them."""
    sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
    from worker.job.pipeline import run_job

    job = json.loads((REPO / "examples" / "demo_job.json").read_text())["input"]
    job["config"].update(max_steps=steps, save_steps=None, logging_steps=1, **config)
    out = []
    for n in (1, 2):
        result = run_job({"input": {**job, "run_id": f"first-step-{os.getpid()}-{n}"}})
        if result["status"] != "completed":
            raise SystemExit(json.dumps(result)[-2000:])
        out.append(result["timings"])
    print("RESULT " + json.dumps(out), flush=True)


def floor_s() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", FLOOR], check=True)
    return time.monotonic() - started


def run_worker(volume: Path, steps: int, config: str, template: bool) -> list[dict]:
    env = {
        **os.environ,
        "BASE_VOLUME": str(volume),
        "FTW_ALLOW_CPU": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")]),
        "FTW_STAGE_TEMPLATE": "1" if template else "0",
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(volume), "--steps", str(steps), "--config", config],
        env=env,
        capture_output=True,
        text=True,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def prepare(volume: Path, rows: int | None) -> None:
    if not (volume / "models" / "ftw-tiny-chatml" / "config.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "worker.devtools.demo",
                "--volume",
                str(volume),
                "--build-model",
                str(volume / "models" / "ftw-tiny-chatml"),
            ],
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])},
        )
    (volume / "data").mkdir(parents=True, exist_ok=True)
    bundled = REPO / "examples" / "data" / "greetings.jsonl"
    if rows is None:
        shutil.copy(bundled, volume / "data" / "greetings.jsonl")
        return
    lines = bundled.read_text().splitlines()
    with open(volume / "data" / "greetings.jsonl", "w") as out:
        for i in range(rows):  # the bundled rows, each name numbered: no two rows the same
            out.write(lines[i % len(lines)].replace("greet ", f"greet {i} ").replace("Hello, ", f"Hello {i}, ") + "\n")


def forget_prepared_data(volume: Path) -> None:
    """The volume's prepared datasets removed (its compile caches kept): the next worker prepares its data anew."""
    for folder in (volume / "cache").glob("*"):
        if folder.name != "compile":
            shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftw-first-step"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="workers per mode (the table shows the median)")
    ap.add_argument(
        "--config", default="{}", help="config keys over the example job's, e.g. '{\"torch_compile\": true}'"
    )
    ap.add_argument("--rows", type=int, help="chat rows in the job's dataset (default: the bundled 240)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps, json.loads(a.config))
        return 0
    volume = a.work / "volume"
    prepare(volume, a.rows)
    floor = sorted(floor_s() for _ in range(max(a.repeat, 1)))[a.repeat // 2]
    rows: list[tuple[str, dict[str, float]]] = [
        ("floor (one process imports torch, transformers, datasets, peft)", {"first_step_s": floor})
    ]
    modes = (  # (label, stage template, the volume's compile caches emptied before each worker)
        ("template", True, True),
        ("template, the volume used before", True, False),
        ("fresh (FTW_STAGE_TEMPLATE=0)", False, True),
    )
    for name, template, cold in modes:
        runs = []
        for _ in range(max(a.repeat, 1)):
            if cold:
                shutil.rmtree(volume / "cache" / "compile", ignore_errors=True)
            forget_prepared_data(volume)
            runs.append(run_worker(volume, a.steps, a.config, template))
        for n in (0, 1):
            if n and not cold:
                continue  # a warm worker's second job is the first mode's
            label = f"{name}, job {n + 1}{' (warm worker)' if n else ' (fresh worker)'}"
            rows.append((label, {k: median([r[n].get(k) for r in runs]) for k in COLUMNS}))
    print(
        f"tiny job, {a.steps} steps, {a.rows or 240} rows, config {a.config}, CPU, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| row | time to first step s | × floor | " + " | ".join(COLUMNS[1:]) + " |")
    print("|---|---:|---:|" + "---:|" * (len(COLUMNS) - 1))
    for label, t in rows:
        cells = ["" if t.get(k) is None else f"{t[k]:.2f}" for k in COLUMNS[1:]]
        print(f"| {label} | {t['first_step_s']:.2f} | {t['first_step_s'] / floor:.2f}× | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

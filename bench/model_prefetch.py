"""Time to first step of a job whose base model comes from the Hub, with and without the prefetch that
downloads it beside preprocessing (worker/job/prefetch.py) and the kernel warm-up that compiles the job's
kernels meanwhile (worker/job/warmup.py), on this machine.

    python bench/model_prefetch.py [--mib-per-s 2] [--repeat 1] [--config '{"torch_compile": true}']

A local Hub (tests/hubserver.py, the HTTP API huggingface_hub speaks) serves the bundled example's
tiny model over a link slowed to --mib-per-s, so its download takes seconds, as a real model's takes
minutes. Each row is one fresh worker process running the example job (3 steps) through `run_job`,
with an empty Hugging Face cache and no compiled kernels on its volume (a model and config this endpoint
never ran): "prefetch" is ftw's default, "no kernel warm-up" is FTW_KERNEL_WARMUP=0 (the first step
compiles them), "after preprocessing" is FTW_MODEL_PREFETCH=0 (the train child downloads the model once
the data is ready). The columns are the job's own timings (worker/job/first_step.py). The warm-up runs
where the first step compiles kernels: on a GPU, or with `--config '{"torch_compile": true}'`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
from bench.first_step import median  # noqa: E402

COLUMNS = ("first_step_s", "preprocess_s", "model_setup_s", "first_step_compute_s", "total_s")
MODES = (
    ("prefetch and kernel warm-up (default)", {}),
    ("prefetch, no kernel warm-up (FTW_KERNEL_WARMUP=0)", {"FTW_KERNEL_WARMUP": "0"}),
    ("after preprocessing (FTW_MODEL_PREFETCH=0)", {"FTW_MODEL_PREFETCH": "0"}),
)


def worker(volume: Path, repo: str, config: dict) -> None:
    """One worker process, one job (its environment names the Hub and the switch)."""
    sys.path[:0] = [str(REPO), str(REPO / "kernels")]  # kernels/: the package ftw_kernels
    from worker.job.pipeline import run_job

    job = json.loads((REPO / "examples" / "demo_job.json").read_text())["input"]
    job["config"].update(base_model=repo, max_steps=3, save_steps=None, logging_steps=1, **config)
    result = run_job({"input": {**job, "run_id": f"prefetch-{os.getpid()}"}})
    if result["status"] != "completed":
        raise SystemExit(json.dumps(result)[-2000:])
    warm_log = Path(result["run_dir"]) / "logs" / "warmup.log"
    lines = warm_log.read_text().strip().splitlines() if warm_log.is_file() else []
    done = [x for x in lines if x.startswith("kernel warm-up")]
    warmup = "not run" if not warm_log.is_file() else (done[-1].removeprefix("kernel warm-up ") if done else "stopped")
    print("RESULT " + json.dumps({**result["timings"], "warmup": warmup, "logs": str(warm_log.parent)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib-per-s", type=float, default=2.0, help="the Hub link's speed for file downloads")
    ap.add_argument("--repeat", type=int, default=1, help="workers per mode (the table shows the median)")
    ap.add_argument("--config", default="{}", help="config keys over the example job's, e.g. '{\"bf16\": true}'")
    ap.add_argument("--logs", type=Path, help="copy each mode's last job logs (the warm-up's among them) here")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.worker[0]), a.worker[1], json.loads(a.config))
        return 0
    sys.path[:0] = [str(REPO), str(REPO / "kernels")]
    from huggingface_hub import HfApi

    from tests.hubserver import running_hub_server
    from worker.devtools.tiny import build_model

    work = Path(tempfile.mkdtemp(prefix="ftw-prefetch-"))
    volume = work / "volume"
    (volume / "data").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "data" / "greetings.jsonl", volume / "data" / "greetings.jsonl")
    model = build_model(work / "model", style="chatml")
    size = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    rows = []
    with running_hub_server(work / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint_url, token=hub.token)
        api.create_repo("bench/tiny", private=True)
        api.upload_folder(folder_path=str(model), repo_id="bench/tiny")
        hub.file_bytes_per_s = a.mib_per_s * 2**20
        runs: dict[str, list[dict]] = {label: [] for label, _ in MODES}
        for _ in range(max(a.repeat, 1)):  # the modes take turns: a machine's first job pays its cold caches
            for label, switches in MODES:
                shutil.rmtree(volume / "hf-home", ignore_errors=True)  # a model this endpoint never loaded
                shutil.rmtree(volume / "cache" / "compile", ignore_errors=True)  # nor compiled its kernels
                env = {
                    **os.environ,
                    "BASE_VOLUME": str(volume),
                    "FTW_ALLOW_CPU": "1",
                    "HF_ENDPOINT": hub.endpoint_url,
                    "HF_TOKEN": hub.token,
                    "HF_HOME": str(volume / "hf-home"),
                    **switches,
                    "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]),
                }
                cmd = [sys.executable, __file__, "--worker", str(volume), "bench/tiny", "--config", a.config]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
                runs[label].append(json.loads(line[-1][7:]))
                if a.logs:
                    kept = a.logs / label.split(" (")[0].replace(" ", "-").replace(",", "")
                    shutil.rmtree(kept, ignore_errors=True)
                    shutil.copytree(runs[label][-1]["logs"], kept)
        for label, done in runs.items():
            rows.append(
                (label, {**{k: median([r.get(k) for r in done]) for k in COLUMNS}, "warmup": done[-1]["warmup"]})
            )
    shutil.rmtree(work, ignore_errors=True)
    device = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(
        f"tiny model, {size / 2**20:.1f} MiB over a {a.mib_per_s:g} MiB/s link, config {a.config}, {device}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print("| mode | " + " | ".join(COLUMNS) + " | × the default's time to first step | the warm-up (last run) |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1) + "---|")
    base = rows[0][1]["first_step_s"]
    for label, t in rows:
        print(
            f"| {label} | "
            + " | ".join("" if t[k] is None else f"{t[k]:.2f}" for k in COLUMNS)
            + f" | {t['first_step_s'] / base:.2f}× | {t['warmup']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

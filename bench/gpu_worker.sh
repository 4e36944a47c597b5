#!/usr/bin/env bash
# The job worker on a real GPU machine (run from the repository root; results under $OUT):
#
#   .venv/bin/python bench/gpu_wheels.py               # here: the wheelhouse .whl/ (~44 MiB) it carries
#   OUT=/tmp/out bash bench/gpu_worker.sh              # on the device machine, with .whl carried
#
# 1. probe.json          the GPU probe's figures (devices, free memory, driver, foreign processes, time)
# 2. probe_missing.json  CUDA_VISIBLE_DEVICES naming a device that does not exist: must fail in seconds
# 3. job_result*.json    real jobs through handler.py, as on RunPod: an unmodified `python handler.py`
#                        in the runpod SDK's platform mode, taking the job from `ftw endpoint` and
#                        submitted with `ftw submit --wait`; a fresh worker boots once its job is
#                        queued, as RunPod starts one (the table's "submit to first step" counts that
#                        boot, the queue's delayTime); a tiny Llama-shaped model built on the
#                        machine (no Hub), LoRA, bf16, on the GPU; run/ holds its checks.json,
#                        summary.json and logs. Then the same worker's second job, and a third job on a
#                        fresh worker over the same volume (its compiled kernels kept there).
# 4. summary.txt         one table of the figures above.
# What the machine's image lacks (runpod, datasets, pydantic, matplotlib, ... for Python 3.12) is
# installed offline from the wheels in $FTW_WHEELS (default .whl, built by bench/gpu_wheels.py) into
# a folder put first on PYTHONPATH. Anything still missing after that stops the script (exit 1): the
# job always goes through handler.py, never around it.
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu-worker-out}
mkdir -p "$OUT"
source bench/gpu_env.sh
log() { echo "[gpu_worker] $*" | tee -a "$OUT/summary.txt"; }
NEEDED="import runpod, runpod.serverless, datasets, pydantic, yaml, matplotlib, boto3, filelock, psutil, aiohttp, handler, worker.devtools.endpoint.server"
ensure_imports "$NEEDED"

record_host
{ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv; \
  $PY -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)"; } >>"$OUT/env.txt" 2>&1

# ---- 1 + 2: the probe -----------------------------------------------------------------------------
$PY - "$OUT" <<'EOF'
import json, os, sys, time
from worker.errors import InfraError
from worker.checks.gpu import probe
out = sys.argv[1]
t = time.monotonic()
try:
    result = probe(dict(os.environ), need_bytes=2 << 30)
    figures = {**result.as_dict(), "wall_s": round(time.monotonic() - t, 3)}
    print(f"probe: {result.count} GPU(s) in {figures['wall_s']} s: " + "; ".join(f"{d.index} {d.name} {d.free_mib}/{d.total_mib} MiB free" for d in result.devices))
except InfraError as e:
    figures = {"failed": True, "message": e.message, "details": e.details, "wall_s": round(time.monotonic() - t, 3)}
    print(f"probe failed: {e.message}")
json.dump(figures, open(f"{out}/probe.json", "w"), indent=2)
t = time.monotonic()
try:
    probe({**os.environ, "CUDA_VISIBLE_DEVICES": "17"})
    missing = {"failed": False}
except InfraError as e:
    missing = {"failed": True, "message": e.message, "hint": e.hint}
missing["wall_s"] = round(time.monotonic() - t, 3)
json.dump(missing, open(f"{out}/probe_missing.json", "w"), indent=2)
print(f"probe of CUDA_VISIBLE_DEVICES=17: failed={missing['failed']} in {missing['wall_s']} s: {missing.get('message', '')}")
EOF
[ $? -eq 0 ] || log "probe script failed"
[ -f "$OUT/probe.json" ] && log "probe figures in probe.json"

# ---- 3: one real job through the handler --------------------------------------------------------
VOL="$OUT/volume"
mkdir -p "$VOL/models" "$VOL/data"
cp examples/data/greetings.jsonl "$VOL/data/"
# GPU_WORKER_HIDDEN=4096 GPU_WORKER_LAYERS=32: a model whose weights take seconds to load (~2 B parameters), which the
# kernel warm-up may now use (it runs on until the train stage's first step)
$PY -m worker.devtools.tiny "$VOL/models/tiny-gpu" --hidden "${GPU_WORKER_HIDDEN:-256}" --layers "${GPU_WORKER_LAYERS:-4}" \
  >"$OUT/build_model.log" 2>&1 || log "model build failed"
cat >"$OUT/job.json" <<EOF
{"input": {"run_id": "gpu-smoke", "config": {
  "base_model": "./models/tiny-gpu",
  "datasets": [{"path": "./data/greetings.jsonl", "type": "chat_template", "field_messages": "messages"}],
  "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": true,
  "sequence_len": 512, "sample_packing": true, "micro_batch_size": 8, "max_steps": ${GPU_WORKER_STEPS:-30},
  "learning_rate": 0.002, "optimizer": "adamw_torch_fused", "bf16": "auto", "warmup_steps": 3,
  "save_steps": 10, "save_total_limit": 2, "logging_steps": 5},
 "publish": ["adapter"], "limits": {"preprocess_s": 600, "train_s": 900}}}
EOF
export BASE_VOLUME="$VOL"
[ "${DRY_RUN_CPU:-}" = 1 ] || unset FTW_ALLOW_CPU   # DRY_RUN_CPU=1 FTW_ALLOW_CPU=1: rehearse on a CPU machine
# the import floor of one process: the yardstick of time to first step (issue 13: fresh ≤ 1.3×, warm ≤ 0.3×)
$PY -c "import subprocess, sys, time; t = time.monotonic(); subprocess.run([sys.executable, '-c', 'import torch, transformers, datasets, peft'], check=True); print(time.monotonic() - t)" >"$OUT/floor_s"
for n in 2 3; do sed "s/\"run_id\": \"gpu-smoke\"/\"run_id\": \"gpu-smoke-$n\"/" "$OUT/job.json" >"$OUT/job$n.json"; done
started=$(date +%s)
# jobs 1 and 3 as RunPod runs a scaled-to-zero endpoint's job: queued first, then a fresh `python handler.py`
# boots and takes it (the queue's delayTime is that boot); job 2 on the same warm worker
$PY - "$OUT" <<'EOF'
import os, secrets, subprocess, sys, time
from worker.devtools.endpoint.client_cli import Client
from worker.devtools.endpoint.local import LocalEndpoint

out = sys.argv[1]
key = secrets.token_hex(16)


def submit(endpoint, n):
    with open(f"{out}/submit{n}.stdout", "w") as stdout, open(f"{out}/submit{n}.stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "worker.cli", "submit", f"{out}/job{n}.json", "--wait"],
                                stdout=stdout, stderr=stderr, env={**os.environ, **endpoint.client_env()})


def queued(endpoint):
    client = Client(endpoint.client_env())  # the runpod SDK's Endpoint, as `ftw submit` uses it
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if client.call("GET", "health", timeout=5)["jobs"]["inQueue"] >= 1:
            return
        time.sleep(0.05)
    raise SystemExit("the job was not queued within 60 s (see submit*.stderr)")


for n, warm in (("", "2"), ("3", None)):
    with LocalEndpoint(db=f"{out}/endpoint{n}.sqlite3", api_key=key, args=("--take-wait-s", "5"),
                       log_path=f"{out}/endpoint{n}.log") as endpoint:
        client = submit(endpoint, n)
        queued(endpoint)
        worker = endpoint.start_worker("handler.py", log_path=f"{out}/worker{n}.log")  # boots for the queued job
        client.wait(480)
        if warm:  # the same worker's next job: its stages fork from the warm stage template
            submit(endpoint, warm).wait(480)
        worker.stop()
EOF
submitted=$?
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
for n in ("", "2", "3"):
    lines = open(f"{out}/submit{n}.stdout").read().strip().splitlines()
    final = json.loads(lines[-1]) if lines else {"status": "none", "error": f"ftw submit printed nothing (see submit{n}.stderr)"}
    json.dump(final, open(f"{out}/status_response{n}.json", "w"), indent=2)
    output = final.get("output")
    result = output[-1] if isinstance(output, list) and output else {"error": final.get("error") or final.get("status")}
    json.dump(result, open(f"{out}/job_result{'_' + n if n else ''}.json", "w"), indent=2)
EOF
via="handler.py (runpod SDK platform mode via ftw endpoint, a fresh worker booted once its job was queued; driver exit $submitted)"
elapsed=$(( $(date +%s) - started ))
mkdir -p "$OUT/run"
for f in checks.json summary.json result.json config.json; do cp "$VOL/runs/gpu-smoke/$f" "$OUT/run/" 2>/dev/null; done
cp -r "$VOL/runs/gpu-smoke/logs" "$OUT/run/" 2>/dev/null
for n in 2 3; do mkdir -p "$OUT/run$n" && cp -r "$VOL/runs/gpu-smoke-$n/logs" "$OUT/run$n/" 2>/dev/null; done
rm -rf "$VOL/models" "$VOL/runs/gpu-smoke/checkpoints" "$VOL/cache"

# ---- 4: the table ---------------------------------------------------------------------------------
$PY - "$OUT" "$via" "$elapsed" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
out, via, elapsed = sys.argv[1], sys.argv[2], sys.argv[3]
def load(name):
    try:
        return json.load(open(f"{out}/{name}"))
    except Exception as e:
        return {"unreadable": str(e)}
p, m, r = load("probe.json"), load("probe_missing.json"), load("job_result.json")
if isinstance(r.get("error"), str):  # the handler's failure item: {"error": "<JSON>"}
    r = json.loads(r["error"])
rows = [("probe: failed", p.get("message", False)), ("probe: GPUs", p.get("count")), ("probe: wall s", p.get("wall_s")), ("probe: driver", p.get("driver")),
        ("probe: devices", "; ".join(f"{d['name']} {d['free_mib']}/{d['total_mib']} MiB" for d in p.get("devices", []))),
        ("probe: foreign processes", len(p.get("foreign_processes", []))),
        ("missing device: failed", m.get("failed")), ("missing device: wall s", m.get("wall_s")),
        ("job via", via), ("job status", r.get("status")), ("job wall s", elapsed)]
metrics = r.get("metrics") or {}
rows += [(f"job metric {k}", metrics.get(k)) for k in ("steps", "final_loss", "tokens_per_s", "precision", "peak_memory_gib", "peak_memory_kind",
                                                    "gpu_type", "gpu_seconds", "estimated_cost_usd", "predicted_peak_memory_gib",
                                                    "predicted_tokens_per_s", "peak_memory_vs_predicted", "tokens_per_s_vs_predicted",
                                                    "gpu_sm_clock_mhz", "gpu_busy_share")]
rows += [("job warning (gpu)", w.get("msg")) for w in r.get("warnings") or [] if w.get("loc") == "gpu"]
rows += [(f"job timing {k}", v) for k, v in (r.get("timings") or {}).items()]
try:
    floor = float(open(f"{out}/floor_s").read())
except (OSError, ValueError):
    floor = None
second, third = load("job_result_2.json"), load("job_result_3.json")
second, third = ((json.loads(x["error"]) if isinstance(x.get("error"), str) else x) for x in (second, third))
rows += [("import floor s (torch, transformers, datasets, peft)", None if floor is None else round(floor, 2))]
jobs = (("job 1 (fresh worker)", r, ""), ("job 2 (warm worker)", second, "2"), ("job 3 (fresh worker, the volume used before)", third, "3"))
for label, result, n in jobs:
    t = result.get("timings") or {}
    first = t.get("first_step_s")
    rows.append((f"time to first step, {label} s", first))
    rows.append((f"time to first step, {label} × floor", round(first / floor, 2) if first and floor else None))
    delay = load(f"status_response{n}.json").get("delayTime")  # ms in the queue: a fresh worker's boot, or a busy one
    if first and isinstance(delay, (int, float)):
        rows.append((f"submit to first step (the queue's delayTime {delay / 1000:.2f} s + the above), {label} s", round(delay / 1000 + first, 3)))
    parts = ("preprocess_s", "train_startup_s", "model_setup_s", "first_step_compute_s")
    rows.append((f"where it went, {label}", ", ".join(f"{k} {t.get(k)}" for k in parts)))
def last_line(path, needle=""):
    try:
        return next((x.strip() for x in reversed(open(path).read().splitlines()) if needle in x and x.strip()), None)
    except OSError:
        return None
# how far each job's kernel warm-up got (recorded, compiled side by side, its pass), and what its first step waited
# for it: the train child waits out the recording and the compiles side by side, and stops it in any other phase
for label, _, n in jobs:
    rows.append((f"{label}: kernel warm-up (logs/warmup.log, last line)", last_line(f"{out}/run{n}/logs/warmup.log")))
    rows.append((f"{label}: the first step's wait for it", last_line(f"{out}/run{n}/logs/train/attempt-1/stderr.log", "kernel warm-up")))
if r.get("status") != "completed":
    rows.append(("job error", json.dumps(r.get("error"))[:400]))
print("| figure | value |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
EOF

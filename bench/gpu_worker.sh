#!/usr/bin/env bash
# The job worker on a real GPU machine (run from the repository root; results under $OUT):
#
#   OUT=/tmp/out bash bench/gpu_worker.sh          # on the device machine: `bash bench/gpu_worker.sh`
#
# 1. probe.json          the GPU probe's figures (devices, free memory, driver, foreign processes, time)
# 2. probe_missing.json  CUDA_VISIBLE_DEVICES naming a device that does not exist: must fail in seconds
# 3. job_result.json     one real job through handler.py (the runpod SDK's local API server, /runsync)
#                        — or through `ftw run` (the same pipeline function) when runpod is not installed —
#                        a tiny Llama-shaped model built on the machine (no Hub), LoRA, bf16, on the GPU;
#                        run/ holds its checks.json, summary.json and logs.
# 4. summary.txt         one table of the figures above.
# Packages the machine lacks (datasets, runpod, ...) are installed from wheels in $FTW_WHEELS (default
# .whl) when that folder exists: pip download them on a machine with internet, as /work/shared/peers
# describes, and carry the folder.
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu-worker-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${FTW_WHEELS:-.whl}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo "[gpu_worker] $*" | tee -a "$OUT/summary.txt"; }

missing=$($PY - <<'EOF'
import importlib.util
need = ["pydantic", "yaml", "datasets", "filelock", "psutil", "matplotlib", "runpod", "boto3"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ] && [ -d "$WHEELS" ]; then
  log "installing from $WHEELS: $missing"
  $PY -m pip install -q --no-index --find-links "$WHEELS" $(echo "$missing" | sed 's/yaml/pyyaml/') >"$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log)"
fi

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv; \
  $PY -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)"; } >"$OUT/env.txt" 2>&1

# ---- 1 + 2: the probe -----------------------------------------------------------------------------
$PY - "$OUT" <<'EOF'
import json, os, sys, time
from worker.errors import InfraError
from worker.job.gpu import probe
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
$PY -m worker.tiny "$VOL/models/tiny-gpu" --hidden 256 --layers 4 >"$OUT/build_model.log" 2>&1 || log "model build failed"
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
started=$(date +%s)
if $PY -c "import runpod" 2>/dev/null; then
  PORT=18765
  $PY handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port $PORT >"$OUT/handler.log" 2>&1 &
  HPID=$!
  $PY - "$OUT" $PORT <<'EOF'
import json, sys, time, urllib.request
out, port = sys.argv[1], sys.argv[2]
for _ in range(120):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=2); break
    except Exception:
        time.sleep(0.5)
body = json.dumps({"input": json.load(open(f"{out}/job.json"))["input"]}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/runsync", data=body, headers={"Content-Type": "application/json"})
response = json.load(urllib.request.urlopen(req, timeout=1500))
json.dump(response, open(f"{out}/runsync_response.json", "w"), indent=2)
json.dump(response["output"][-1], open(f"{out}/job_result.json", "w"), indent=2)
EOF
  kill $HPID 2>/dev/null; wait $HPID 2>/dev/null
  via="handler.py (runpod SDK local API, /runsync)"
else
  $PY -m worker.cli run "$OUT/job.json" >"$OUT/ftw_run.stdout" 2>"$OUT/ftw_run.stderr"
  tail -n 1 "$OUT/ftw_run.stdout" >"$OUT/job_result.json"
  via="ftw run (runpod is not installed here; same pipeline function as handler.py)"
fi
elapsed=$(( $(date +%s) - started ))
mkdir -p "$OUT/run"
for f in checks.json summary.json result.json config.json; do cp "$VOL/runs/gpu-smoke/$f" "$OUT/run/" 2>/dev/null; done
cp -r "$VOL/runs/gpu-smoke/logs" "$OUT/run/" 2>/dev/null
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
                                                    "predicted_tokens_per_s", "peak_memory_vs_predicted", "tokens_per_s_vs_predicted")]
rows += [(f"job timing {k}", v) for k, v in (r.get("timings") or {}).items()]
if r.get("status") != "completed":
    rows.append(("job error", json.dumps(r.get("error"))[:400]))
print("| figure | value |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
EOF

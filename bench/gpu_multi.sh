#!/usr/bin/env bash
# Several GPUs through the job path (issue 18 part 2), on an nvidia-h200-x2 machine:
#
#   .venv/bin/python bench/gpu_wheels.py                    # here: the wheelhouse .whl/ (incl. deepspeed)
#   OUT=/tmp/out bash bench/gpu_multi.sh                     # on the device machine, with .whl carried
#   DRY_RUN_CPU=1 OUT=/tmp/out bash bench/gpu_multi.sh       # rehearsal on a CPU machine (tiny shape, gloo)
#
# 1. probe.json       the GPU probe of CUDA_VISIBLE_DEVICES=0,1 (count, free memory, foreign processes)
# 2. gpu_multi.json   bench/gpu_multi.py: `ftw run` on 1 GPU then 2 GPUs × {ddp, fsdp2, zero2, zero3}
#                     for the Llama-3.1-8B shape (LoRA) and the Llama-3.2-1B shape (full fine-tuning):
#                     tokens/s, tokens/s per GPU, scaling efficiency against 1 GPU in the same call,
#                     peak memory per GPU; then one rank SIGKILLed mid-run → typed failure, resume.
# 3. summary.txt      the table.
# GPU_MULTI_ARGS passes options to bench/gpu_multi.py (e.g. "--steps 20 --shapes llama-8b"; "--shapes= --no-kill
# --joined": only the 8B LoRA shape's joined steps under DDP against one pass a micro-batch, on unpacked samples).
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu-multi-out}
mkdir -p "$OUT"
source bench/gpu_env.sh
log() { echo "[gpu_multi] $*" | tee -a "$OUT/summary.txt"; }
ensure_imports "import runpod, datasets, pydantic, yaml, boto3, deepspeed, handler, worker.job.pipeline"
export BASE_VOLUME="${BASE_VOLUME:-$OUT/volume}"   # a folder outside OUT keeps models/caches across calls on a warm machine

if [ "${DRY_RUN_CPU:-}" = 1 ]; then
  export FTW_ALLOW_CPU=1
  ARGS="--dry-run-cpu --steps 6 --warmup 2 --save-steps 2 --kill-steps 300 --seq 128 --mbs 2 --rows 300 --arm-timeout 600"
else
  unset FTW_ALLOW_CPU
  export CUDA_VISIBLE_DEVICES=0,1
  record_host
  $PY -c "import sys, torch, deepspeed; print(sys.version.split()[0], torch.__version__, deepspeed.__version__)" >>"$OUT/env.txt" 2>&1
  $PY -c "
import json, os, sys
from worker.checks.gpu import probe
r = probe(dict(os.environ), need_bytes=2 << 30)
json.dump(r.as_dict(), open(sys.argv[1], 'w'), indent=2)
print(f'probe: {r.count} GPU(s)')" "$OUT/probe.json" | tee -a "$OUT/summary.txt" || log "probe FAILED"
  ARGS=""
fi
$PY bench/gpu_multi.py --out "$OUT" $ARGS ${GPU_MULTI_ARGS:-} 2>"$OUT/gpu_multi.stderr" | tee -a "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
[ $rc -eq 0 ] || { log "gpu_multi.py exited $rc (see gpu_multi.stderr)"; tail -n 30 "$OUT/gpu_multi.stderr"; }
exit $rc

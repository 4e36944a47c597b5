#!/usr/bin/env bash
# FP8 base weights (`fp8_base_weights`, issue 13 target 4) on one Hopper GPU, from the repository root:
#
#   .venv/bin/python bench/gpu_wheels.py     # here: the wheelhouse .whl/ (pydantic & co. for schemas/)
#   OUT=/tmp/out bash bench/gpu_fp8.sh       # on the device machine, with .whl carried (~190 s)
#
# 1. tests.txt        tests/kernels/test_fp8_gpu.py (tests/kernels/test_fp8.py is the CPU side)
# 2. ops.txt          bench/fp8_ops.py: each projection's bf16 GEMM against the fp8 GEMM, quantisation and transpose
# 3. throughput.txt   bench/train_throughput.py, Llama-3.1-8B shape, mbs 4 × 2048 packed: ftw (bf16 base)
#                     then ftw-fp8, each a fresh process, $STEPS timed steps (12), kernel profiles in prof-*
# 4. loss_curve.txt   --loss-curve $CURVE_STEPS (200), Llama-3.2-1B shape, 1 × 2048 a step, lr 1e-3: hf, hf
#                     again (bf16's run-to-run noise) and ftw-fp8, each step's |Δloss| against hf
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu-fp8-out}
mkdir -p "$OUT"
source bench/gpu_env.sh
log() { echo "[gpu_fp8] $*" | tee -a "$OUT/summary.txt"; }
ensure_imports "import pydantic, yaml, schemas.config, ftw_kernels, peft"
record_host
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_capability())" >>"$OUT/env.txt" 2>&1
log "tests"
$PY -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_gpu.py 2>&1 | tail -n 25 >"$OUT/tests.txt"
tail -n 1 "$OUT/tests.txt" | tee -a "$OUT/summary.txt"
log "ops at the 8B shapes"
$PY bench/fp8_ops.py 2>&1 | tee "$OUT/ops.txt" | tail -n 13 >>"$OUT/summary.txt"
log "throughput, llama-8b: ftw vs ftw-fp8"
$PY bench/train_throughput.py --shapes llama-8b --arms ftw,ftw-fp8 --steps "${STEPS:-12}" --warmup 3 \
  --profile "$OUT/prof" --arm-timeout 240 --json "$OUT/throughput.json" 2>"$OUT/throughput.stderr" | tee "$OUT/throughput.txt" | grep "^|" | tee -a "$OUT/summary.txt"
log "loss curve, llama-1b"
$PY bench/train_throughput.py --loss-curve "${CURVE_STEPS:-200}" --shapes llama-1b --mbs 1 --lr 1e-3 --arms ftw-fp8 \
  --json "$OUT/loss_curve.json" 2>"$OUT/loss_curve.stderr" | tee "$OUT/loss_curve.txt" | grep "^LOSS_CURVE" | tee -a "$OUT/summary.txt"

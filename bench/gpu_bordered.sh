#!/usr/bin/env bash
# The device calls that decide FTW_BORDERED_LORA's default and measure beta one (docs/benchmarks.md,
# "2026-12-05: beta one and the bordered forward"), from the repository root:
#
#   .venv/bin/python bench/qlora_wheels.py --out .whl-qlora    # here: Unsloth, its peers and pydantic & co.
#   git archive d886270 kernels bench schemas worker | (mkdir -p .gpu/before && tar -x -C .gpu/before)  # for `ab`
#   OUT=$OUT bash bench/gpu_bordered.sh tests ops 1b           # on the device machine, carrying .whl-qlora (~6 min)
#   OUT=$OUT bash bench/gpu_bordered.sh 8b                     # the next call (~6 min)
#   OUT=$OUT bash bench/gpu_bordered.sh ab                     # beta one against the tree before it (.gpu carried)
#
# Parts (default: all, which is longer than one call may run):
#   tests  tests.txt      the kernels' CUDA tests, the bordered ones among them
#   ops    ops.txt        bench/lora_ops.py: one layer's LoRA projections, ftw against ftw over bordered weights
#   1b, 8b tokens-<shape>.txt  bench/train_throughput.py, full-length rows: unsloth, ftw, ftw-bordered, each a
#                         fresh process in the same call
#   ab     ab.txt         bench/tree_ab.py: this tree's ftw arm against .gpu/before's, interleaved, at 1B
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu-bordered-out}
mkdir -p "$OUT"
export FTW_WHEELS=${FTW_WHEELS:-.whl-qlora} FTW_SITE=${FTW_SITE:-/tmp/site}
source bench/gpu_env.sh
export UNSLOTH_DISABLE_STATISTICS=1 TRANSFORMERS_OFFLINE=1
log() { echo "[gpu_bordered] $*" | tee -a "$OUT/summary.txt"; }
ensure_imports "import pydantic, yaml, schemas.config, ftw_kernels, peft"
nvidia-smi -L >"$OUT/env.txt" 2>&1

throughput() {  # shape, steps, arm timeout
  log "train_throughput $1: unsloth, ftw, ftw-bordered"
  $PY bench/train_throughput.py --full-length --warmup 3 --shapes "$1" --arms unsloth,ftw,ftw-bordered \
    --steps "$2" --arm-timeout "$3" --json "$OUT/tokens-$1.json" 2>"$OUT/tokens-$1.stderr" \
    | tee "$OUT/tokens-$1.txt" | grep "^|" | tee -a "$OUT/summary.txt"
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests ops 1b 8b ab)
for part in "${parts[@]}"; do
  case $part in
    tests)
      log "tests"
      $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gpu.py tests/kernels/test_bordered.py \
        tests/kernels/test_lora_passes.py tests/kernels/test_adapter_copies.py tests/kernels/test_qlora.py \
        tests/kernels/test_fp8_gpu.py 2>&1 | tail -n 30 >"$OUT/tests.txt"
      tail -n 1 "$OUT/tests.txt" | tee -a "$OUT/summary.txt" ;;
    ops)
      log "lora_ops 8b, 1b"
      $PY bench/lora_ops.py --shapes 8b,1b 2>&1 | tee "$OUT/ops.txt" | grep "^|" | tee -a "$OUT/summary.txt" ;;
    1b) throughput llama-1b 12 90 ;;
    8b) throughput llama-8b 10 160 ;;
    ab)
      log "tree_ab llama-1b against .gpu/before"
      $PY bench/tree_ab.py --old .gpu/before --site "$FTW_SITE" --shapes llama-1b --rounds 2 --steps 12 \
        2>&1 | tee "$OUT/ab.txt" | tail -n 8 >>"$OUT/summary.txt" ;;
    *) log "unknown part '$part' (tests, ops, 1b, 8b, ab)"; exit 2 ;;
  esac
done

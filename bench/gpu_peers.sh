#!/usr/bin/env bash
# bench/train_throughput.py on the GPU machine with the peer arms' packages (run from the repository root):
#
#   OUT=/tmp/out bash bench/gpu_peers.sh --shapes llama-8b --gc both    # any train_throughput.py options
#   OUT=/tmp/out WHEELS=.whl-qlora BENCH=bench/qlora.py bash bench/gpu_peers.sh --shape llama-8b --gc off
#
# The machine has no internet: the wheels travel in .whl-train/ and .whl-peers/ (git-ignored; carry both),
# or in the folders WHEELS names (bench/qlora_wheels.py builds .whl-qlora). They go to /tmp/site, first
# on PYTHONPATH; .whl-peers/if-missing/ only where the image lacks the module.
# Results: $OUT/train_throughput.{txt,json} when OUT is set; with BENCH (another bench script, given
# --out $OUT) its printout in $OUT/<script>.txt.
set -uo pipefail
PY=${PYTHON:-python3}
SITE=/tmp/site
shopt -s nullglob
folders=(${WHEELS:-.whl-train .whl-peers})
wheels=()
for f in "${folders[@]}"; do wheels+=("$f"/*.whl); done
[ ${#wheels[@]} -gt 0 ] || { echo "gpu_peers.sh: no wheels in ${folders[*]} (carry them with the call)" >&2; exit 1; }
for w in .whl-peers/if-missing/*.whl; do
  name=$(basename "$w" | cut -d- -f1)
  module=${name/#pillow/PIL}
  $PY -c "import $module" 2>/dev/null || wheels+=("$w")
done
stamp="$SITE/.installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" || exit 1
  echo "${wheels[*]}" >"$stamp"
fi
export PYTHONPATH="$SITE:$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"  # kernels/: the package ftw_kernels
export UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${BENCH:-}" ]; then
  mkdir -p "${OUT:?BENCH needs OUT}"
  $PY "$BENCH" --out "$OUT" "$@" | tee "$OUT/$(basename "$BENCH" .py).txt"
elif [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  $PY bench/train_throughput.py --json "$OUT/train_throughput.json" "$@" | tee "$OUT/train_throughput.txt"
else
  $PY bench/train_throughput.py "$@"
fi

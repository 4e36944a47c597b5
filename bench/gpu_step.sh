#!/usr/bin/env bash
# The device calls that measure a change to the LoRA step against Unsloth and against the tree before it
# (docs/benchmarks.md: "2026-12-05: beta one and the bordered forward", "2026-12-05: the residual adds folded",
# "2026-12-05, afternoon: …"), from the repository root:
#
#   .venv/bin/python bench/qlora_wheels.py --out .whl-qlora    # here: Unsloth, its peers and pydantic & co.
#   git archive REV kernels bench schemas worker | (mkdir -p .gpu/before && tar -x -C .gpu/before)  # for `ab`
#   OUT=$OUT bash bench/gpu_step.sh tests ab                   # on the device machine, carrying .whl-qlora, .gpu
#
# Issue 13's rows, every ftw real-path row timed on the GPU's clock, most wanted first (one call ≤ 10 minutes; call
# each as soon as the one before returns: a held machine keeps the models and Unsloth's compiled kernels under /tmp).
# Measured on 2026-12-05 (fifth session, H100): every QLoRA and memory-saving row at 8B and 1B, the 8B real path,
# the CUDA tests and the recompute's two skips against the trees before them (docs/benchmarks.md "2026-12-05, fifth
# session"), e.g.
#   OLD=.gpu/before,.gpu/tail-gemm AB_SHAPES=llama-8b AB_GC=offload OUT=$OUT bash bench/gpu_step.sh tests ab
#   ARMS=unsloth SHAPES=llama-8b OUT=$OUT bash bench/gpu_step.sh offload
#   QLORA_GC=on OUT=$OUT bash bench/gpu_step.sh qlora8b
# Measured on 2026-12-05 (sixth session, H100): the float8 matmuls over the 4-bit base at 8B by `step_ms`, without
# checkpointing (QLORA_ARMS=unsloth,ftw-real,ftw-real-fp8 OUT=$OUT bash bench/gpu_step.sh qlora8b). Still wanted:
#   QLORA_GC=on QLORA_ARMS=unsloth,ftw-real,ftw-real-fp8 OUT=$OUT bash bench/gpu_step.sh qlora8b
# Measured on 2026-12-05 (seventh session, H100): LoRA's dropout and the 8-bit base at 8B against Unsloth, the passes
# that draw the mask themselves, this tree against the one before with dropout (docs/benchmarks.md, "seventh
# session"). Measured on 2026-12-06 (H100): the CUDA run of test_int8_base.py and test_lora_dropout.py, the mask's
# 16-bit draws (dropout-ops, ab, dropout at 8B), bench/down_term.py, and the `masked` and `unpacked` rows at both
# shapes (docs/benchmarks.md, "2026-12-06"). Measured on 2026-12-06 (ninth session, H100): the CUDA tests, both of
# those in the step against bfe5803 (ab, with and without dropout), dense bf16 at 1B and 8B interleaved with Unsloth,
# and the 8B profile of both (`profile`; bench/step_split.py sums its traces). Measured on 2026-12-06 (tenth session,
# H100): the CUDA tests, the term kernel's tilings, gate's and up's dyb inside it (not kept), the bordered dx
# isolated (`gemms`), each projection's dyb and B grad from one read of dy (`rank-grads`, and `ab` against e376eef),
# dense bf16 at 8B interleaved with Unsloth. Measured on 2026-12-06 (eleventh session, H100): the CUDA tests, the
# step's GEMMs against cuBLASLt's other algorithms (`algos`), QLoRA at 8B without checkpointing, the unpacked rows
# in steady state (`unpacked`, now with --replay), the host's side of a short step (PROFILE_HOW="--unpacked
# --replay" ... profile), the host's grid arithmetic in short steps (AB_UNPACKED=1 ... ab). Measured on 2026-12-06
# (thirteenth session, H100): the CUDA tests of the adapter copies, the copies and the branch next/rank-grads-finish
# in short steps (inconclusive: the runs' spread was larger than either change), dropout and int8 at 1B (int8's PEFT
# arm cut), `real-unpacked` (its bare arm then paid its compiles inside the timed steps; fixed since). Measured on
# 2026-12-06 (fourteenth session, H100): `joined real-unpacked` (8B 2.52×; the real path's short 1B steps wait on the
# device, 0.60-0.72× the bare loop). Measured on 2026-12-06 (fifteenth session, H100): `new-shapes` (a GEMM at 1B's
# shapes waits for the device at each new token count) and, through the branch next/real-path-waits, the real path
# against the bare loop unreplayed (1.00×; docs/benchmarks.md, "fifteenth session"). Measured on 2026-12-07 (sixteenth
# session, H100): `new-shapes profile` under expandable segments (which GEMM calls wait in a fresh step) and the bare
# loop's short steps under both allocators (docs/benchmarks.md, "sixteenth session"). Measured on 2026-12-07
# (seventeenth session, H200): `real-unpacked` at 1B under both allocators, also with REAL_WARMUP=60, and `unpacked`
# at 1B and 8B under both (docs/benchmarks.md, "seventeenth session"). Measured on 2026-12-07 (eighteenth session,
# H200): `real-unpacked` three times with REAL_WARMUP=60 and `unpacked` (UNPACKED_ARMS=ftw) on a slower host. On
# 2026-12-07 (nineteenth session, H100): `variants`, and with each arm under py-spy (HOST_SAMPLES, bench/host_samples.py;
# py-spy comes with .whl and lands on PATH from $FTW_SITE/bin):
#   HOST_SAMPLES=$OUT/hs REAL_STEPS=150 VARIANT_ARMS=bare-fresh,ftw SHAPES=llama-1b OUT=$OUT bash bench/gpu_step.sh variants
#   python3 bench/host_samples.py $OUT/hs --steps 190 --base bare-fresh   # now done by `variants` itself, each round
# On 2026-12-07 (twentieth session, H100): the CUDA tests of the replayed update and the staged batches, and
# `variants` against the update left eager (docs/benchmarks.md, "twentieth session"):
#   TESTS="tests/train/test_graphed_update.py tests/train/test_host_sync.py tests/train/test_step_time.py \
#     tests/train/test_clip.py tests/train/test_prefetch.py" REAL_STEPS=100 VARIANT_ROUNDS=2 \
#     VARIANT_ARMS=bare-fresh,ftw,ftw~eager-update SHAPES=llama-1b OUT=$OUT bash bench/gpu_step.sh tests variants
# On 2026-12-07 (twenty-first and twenty-second sessions, H100): the same arms sampled (host-samples-llama-1b-<round>.md
# splits the step's host time), and the fixed tree's CUDA tests:
#   TESTS="tests/train/test_graphed_update.py tests/kernels/test_adapter_copies.py tests/train/test_host_sync.py" \
#     HOST_SAMPLES=$OUT/hs REAL_STEPS=150 VARIANT_ROUNDS=2 VARIANT_ARMS=bare-fresh,ftw,ftw~eager-update \
#     SHAPES=llama-1b OUT=$OUT bash bench/gpu_step.sh tests variants
# and bench/gpu_worker.sh (carrying .whl, bench/gpu_wheels.py, with FTW_WHEELS=.whl; .whl-qlora does not fit beside it):
#   OUT=$OUT bash bench/gpu_worker.sh
# Wanted (twenty-third session: the batches now read by the loop itself, through `Rows`; no device came), without
# py-spy (sampled arms are slowed unequally): the loop's own reads against the prefetch thread it replaced and against
# every batch read first, beside the fresh bare loop:
#   TESTS="tests/train/test_step_batches.py tests/train/test_host_sync.py tests/train/test_graphed_update.py \
#     tests/kernels/test_rope_angles.py" REAL_STEPS=150 VARIANT_ROUNDS=2 \
#     VARIANT_ARMS=bare-fresh,ftw,ftw~prefetch-thread,ftw~stock-rope SHAPES=llama-1b \
#     OUT=$OUT bash bench/gpu_step.sh tests variants
# (twenty-fourth session: under TF32, which `ftw train` turns on and the bare loop does not, the trainer's rotary
# angles are now an elementwise product, not transformers' fp32 GEMM; the CUDA test prints whether this GPU's cuBLAS
# rounded that GEMM, and `stock-rope` puts it back: the twenty-second session sampled ~1 ms a step of `ftw train`'s
# host on that line and ~0 of the bare loop's.)
# Measured on 2026-12-08 (twenty-fifth session, a slow H100 host; docs/benchmarks.md "twenty-fifth session"), the
# same without the prefetch-thread arm (VARIANT_ARMS=bare-fresh,ftw,ftw~stock-rope), and bench/gpu_worker.sh after it.
# Wanted (twenty-sixth session, no device lent: the kernel warm-up now records its kernels and compiles them side by
# side in worker processes, and the train child waits that out): the compiles on the GPU, with the warm-up's and the
# precompile's tests, then bench/gpu_worker.sh (carrying .whl: each job's warm-up line and its first step's wait),
# also on a job whose model loads for seconds; `ftw~prefetch-thread` against `ftw` on a slow host:
#   TESTS="tests/kernels/test_precompile.py tests/train/test_warmup.py" SHAPES=llama-1b,llama-8b \
#     OUT=$OUT bash bench/gpu_step.sh tests compiles
#   OUT=$OUT bash bench/gpu_worker.sh; GPU_WORKER_HIDDEN=4096 GPU_WORKER_LAYERS=32 OUT=$OUT/big bash bench/gpu_worker.sh
#
# Parts (default: tests ops 1b 8b ab, which is longer than one call may run):
#   tests  tests.txt      the kernels' CUDA tests ($TESTS: default, every test file with a CUDA part)
#   ops    ops.txt        bench/lora_ops.py: one layer's LoRA projections, ftw against ftw over bordered weights
#   gemms  gemms.txt      bench/stacked_gemms.py: each projection group's GEMMs as ftw runs them against stacked and
#                         bordered weights, forward and dx
#   new-shapes new-shapes.txt  bench/new_shapes.py: a GEMM call's host time at a token count the process has not
#                         met against one it has (every padding-free step of unpacked rows brings new counts), with
#                         the driver loading kernels on first use (LAZY, CUDA's default) and all at start (EAGER);
#                         then 1B's GEMMs a row each, and a round under torch.profiler (the call that waits)
#   algos  algos.txt      bench/gemm_algos.py: the 8B step's GEMMs at the power cap, as torch runs them against every
#                         algorithm cuBLASLt's heuristic offers
#   rank-grads rank-grads.txt  bench/rank_grads.py: each projection's dyb and B grad from one read of its dy against
#                         cuBLAS's two GEMMs, and the kernel's tilings
#   dropout-ops dropout-ops.txt  bench/lora_dropout.py (the mask redrawn against torch's kept one),
#                         bench/down_term.py --tiles (down's term inside the SwiGLU backward, at three tilings) and
#                         bench/lora_ops.py --lora-dropout 0.05 (one layer: PEFT's dropout against the fused one)
#   1b, 8b tokens-<shape>.txt  bench/train_throughput.py, full-length rows, each arm a fresh process in the same
#                         call: $ARMS (default unsloth,ftw,ftw-unbordered)
#   real   real-<shape>/  bench/gpu_train.py at $SHAPES (default llama-1b,llama-8b), full-length: `ftw train`'s real
#                         path against the bare loop with the same kernels (its `bare` arm), each step timed on the
#                         GPU's clock
#   real-unpacked real-unpacked-<shape>/  the same with --unpacked rows (sample_packing: false): the trainer's
#                         padding-free batches end to end, against the bare loop's, replayed and not (bare-fresh)
#                         ($REAL_STEPS steps timed after $REAL_WARMUP, default 3; e.g. REAL_WARMUP=60: steady state,
#                         once the run has met most of its token counts)
#   variants variants-<shape>-<round>/  bench/gpu_train.py --unpacked at $SHAPES (mbs 8 at 1B, 4 at 8B), $REAL_STEPS
#                         steps timed after $REAL_WARMUP: the fresh bare loop, `ftw train` and `ftw train` with parts of
#                         its step taken out ($VARIANT_ARMS, default every variant of bench/train_variants.py alone and
#                         all together), in $VARIANT_ROUNDS rounds (default 1: six arms of ~45 s on a slow host; a
#                         second round, in the other order, is a second call's worth). With HOST_SAMPLES=DIR each arm
#                         runs under py-spy, a round's samples in DIR/<shape>-<round>/, and
#                         host-samples-<shape>-<round>.md holds bench/host_samples.py's tables of them
#   joined joined-<shape>/  bench/gpu_train.py --unpacked --accum 8 at $SHAPES (mbs 2 at 1B, 1 at 8B): `ftw train`
#                         with each step's samples joined across its micro-batches (ftw) against a pass a micro-batch
#                         (ftw-unjoined, FTW_JOIN_STEPS=0)
#   offload offload-<shape>.txt  the memory-saving rows at $SHAPES: ftw's real path with offloaded checkpointing
#                         (bench/gpu_train.py) and Unsloth's offloaded checkpointing (bench/train_throughput.py)
#   qlora8b, qlora1b  qlora-<shape>-<gc>/  bench/qlora.py, checkpointing $QLORA_GC (off, on: offloaded; default
#                         off), arms $QLORA_ARMS (default: Unsloth's 4-bit arm, ftw's fused path in a bare loop and
#                         ftw's real path)
#   masked masked-<shape>.txt  bench/train_throughput.py, full-length rows whose first half is a masked prompt
#                         (--prompt-share 0.5) at $SHAPES: Unsloth, ftw (the loss head over the target rows, as the
#                         trainer's prefetcher lists them) and ftw-all-rows (every row to the head, as before)
#   dropout dropout-<shape>.txt  bench/train_throughput.py, full-length rows, lora_dropout 0.05 (most of axolotl's
#                         examples) at $SHAPES: $DROPOUT_ARMS (default Unsloth, whose fused LoRA takes dropout since
#                         2026.10, ftw's fused LoRA with its shared, redrawn masks, and ftw-peft-lora: PEFT's LoRA
#                         layers beside ftw's other kernels, what such a config ran before)
#   int8   int8-<shape>.txt  bench/train_throughput.py --8bit, full-length rows, over a bitsandbytes int8 base
#                         (`load_in_8bit`) at $SHAPES: $INT8_ARMS (default Unsloth's load_in_8bit, ftw's fused LoRA
#                         over the int8 weights dequantised per matmul, and ftw-peft-lora: PEFT's 8-bit LoRA layers
#                         beside ftw's other kernels, what such a config ran before)
#   unpacked unpacked-<shape>.txt  bench/train_throughput.py --unpacked at $SHAPES: mbs samples a step, one a row,
#                         padded to the longest; $UNPACKED_ARMS (default Unsloth (padded rows), ftw (each micro-batch's
#                         samples joined into one row, as the trainer's padding-free batches) and ftw-padded (the
#                         padded rows, as before))
#   profile prof-<shape>-gcoff[-<arm>].txt  bench/train_throughput.py --profile at $SHAPES, arms $ARMS, rows
#                         $PROFILE_HOW (default --full-length; e.g. "--unpacked --replay"): each arm's kernels by GPU
#                         time over three steps, its GPU-busy ms a step, a trace (.trace.json.gz) and the host's
#                         Python functions under cProfile (.host.txt), and bench/host_waits.py over the traces (the
#                         host's CUDA calls that wait); without --replay the three steps' batches are new to the arm
#   compiles compiles.txt bench/parallel_compile.py at $SHAPES (4 × 2048 packed): the kernel warm-up's one-layer pass
#                         recorded on this GPU, its kernels compiled one after another (as a first step does) and side
#                         by side in 1, 4, 8 and 15 processes, each into an empty cache
#   ab     ab.txt         bench/tree_ab.py: this tree's ftw arm against $OLD's (default .gpu/before; several trees
#                         separated by commas), interleaved, at $AB_SHAPES (default llama-1b), checkpointing $AB_GC
#                         (off, on, offload; default off), lora_dropout $AB_DROPOUT (default 0), $AB_ROUNDS rounds
#                         (default 2); AB_UNPACKED=1: short steps (unpacked samples, padding-free, --replay), whose
#                         host-bound times vary more from run to run (AB_ROUNDS=4)
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu-step-out}
ARMS=${ARMS:-unsloth,ftw,ftw-unbordered} OLD=${OLD:-.gpu/before} AB_SHAPES=${AB_SHAPES:-llama-1b} AB_GC=${AB_GC:-off}
AB_DROPOUT=${AB_DROPOUT:-0} AB_ROUNDS=${AB_ROUNDS:-2}
SHAPES=${SHAPES:-llama-1b,llama-8b} QLORA_GC=${QLORA_GC:-off} QLORA_ARMS=${QLORA_ARMS:-unsloth,ftw,ftw-real}
TESTS=${TESTS:-tests/kernels/test_gpu.py tests/kernels/test_bordered.py tests/kernels/test_lora_passes.py \
tests/kernels/test_adapter_copies.py tests/kernels/test_qlora.py tests/kernels/test_fp8_gpu.py \
tests/kernels/test_residual_fold.py tests/kernels/test_apply_kernels.py tests/train/test_step_time.py \
tests/kernels/test_target_rows.py tests/train/test_host_sync.py tests/train/test_target_rows.py \
tests/kernels/test_lora_dropout.py tests/kernels/test_dropout_mask.py tests/kernels/test_int8_base.py \
tests/kernels/test_rank_grads.py tests/kernels/test_grids.py tests/train/test_graphed_update.py tests/train/test_step_batches.py \
tests/train/test_warmup.py}
mkdir -p "$OUT"
# every ftw arm under the allocator ftw's checks pick for these shapes on an 80 GB card: fixed segments, as the predicted
# peak leaves room for what they cache (worker/checks/gpu.allocator_conf; until 2026-12-07 expandable segments);
# Unsloth's under its own default, expandable segments (bench/unsloth_arm.prepare)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:False}
export FTW_WHEELS=${FTW_WHEELS:-.whl-qlora} FTW_SITE=${FTW_SITE:-/tmp/site}
source bench/gpu_env.sh
export UNSLOTH_DISABLE_STATISTICS=1 TRANSFORMERS_OFFLINE=1
log() { echo "[gpu_step] $*" | tee -a "$OUT/summary.txt"; }
ensure_imports "import pydantic, yaml, schemas.config, ftw_kernels, peft"
record_host

throughput() {  # shape, steps, arm timeout
  log "train_throughput $1: $ARMS"
  $PY bench/train_throughput.py --full-length --warmup 3 --shapes "$1" --arms "$ARMS" \
    --steps "$2" --arm-timeout "$3" --json "$OUT/tokens-$1.json" 2>"$OUT/tokens-$1.stderr" \
    | tee "$OUT/tokens-$1.txt" | grep "^|" | tee -a "$OUT/summary.txt"
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests ops 1b 8b ab)
for part in "${parts[@]}"; do
  case $part in
    tests)
      log "tests"
      # whole: a failure's traceback comes back, and -rP keeps what passing tests print (what the device's cuBLAS did)
      # shellcheck disable=SC2086  # $TESTS: several paths
      $PY -m pytest -q -rP -p no:cacheprovider $TESTS >"$OUT/tests.txt" 2>&1
      { grep -E "^(FAILED|ERROR) " "$OUT/tests.txt"; tail -n 1 "$OUT/tests.txt"; } | tee -a "$OUT/summary.txt" ;;
    ops)
      log "lora_ops 8b, 1b"
      $PY bench/lora_ops.py --shapes 8b,1b 2>&1 | tee "$OUT/ops.txt" | grep "^|" | tee -a "$OUT/summary.txt" ;;
    gemms)
      log "stacked_gemms 8b, 1b"
      $PY bench/stacked_gemms.py --shapes llama-8b,llama-1b 2>&1 | tee "$OUT/gemms.txt" | grep "^|" | tee -a "$OUT/summary.txt" ;;
    rank-grads)
      log "rank_grads 8b, 1b"
      $PY bench/rank_grads.py --shapes llama-8b,llama-1b --tiles 128x64x4,256x64x8 --programs-per-sm 1,2 2>&1 \
        | tee "$OUT/rank-grads.txt" | grep "^|" | tee -a "$OUT/summary.txt" ;;
    new-shapes)  # the driver loads each kernel on its first use (CUDA_MODULE_LOADING=LAZY) unless told EAGER
      for loading in LAZY EAGER; do
        log "new_shapes, CUDA_MODULE_LOADING=$loading: a GEMM call's host time at token counts never met, and one met"
        CUDA_MODULE_LOADING=$loading $PY bench/new_shapes.py 2>&1 | tee -a "$OUT/new-shapes.txt" | grep "^|" \
          | tee -a "$OUT/summary.txt"
      done
      log "new_shapes 1b, a row per GEMM, and one round under torch.profiler (which call waits: new-shapes.txt)"
      $PY bench/new_shapes.py --shapes llama-1b --counts 30 --by-gemm --profile --swept 2>&1 | tee -a "$OUT/new-shapes.txt" \
        | grep "^|" | tee -a "$OUT/summary.txt" ;;
    algos)
      log "gemm_algos 8b: the step's GEMMs at the power cap, torch's cuBLAS against cuBLASLt's other algorithms"
      $PY bench/gemm_algos.py --shapes llama-8b 2>&1 | tee "$OUT/algos.txt" | grep -E "^\||GEMMs" \
        | tee -a "$OUT/summary.txt" ;;
    dropout-ops)
      log "lora_dropout; lora_ops 8b, 1b with lora_dropout 0.05"
      { $PY bench/lora_dropout.py --shapes llama-8b,llama-1b
        $PY bench/down_term.py --shapes llama-8b,llama-1b --tiles 16x8,16x16,32x16
        $PY bench/lora_ops.py --shapes 8b,1b --lora-dropout 0.05; } \
        2>&1 | tee "$OUT/dropout-ops.txt" | grep "^|" | tee -a "$OUT/summary.txt" ;;
    real | real-unpacked)
      layout=--full-length tag=real arms=bare,ftw
      [ "$part" = real-unpacked ] && layout=--unpacked tag=real-unpacked arms=bare,bare-fresh,ftw
      for shape in llama-1b:8:12:90 llama-8b:4:10:150; do
        IFS=: read -r name mbs steps limit <<<"$shape"
        [[ ",$SHAPES," == *",$name,"* ]] || continue
        log "gpu_train $name, $layout: ${arms//,/, }, ${REAL_STEPS:-$steps} steps timed after ${REAL_WARMUP:-3}"
        $PY bench/gpu_train.py --out "$OUT/$tag-$name" --work "/tmp/$tag-$name" --shape "$name" --mbs "$mbs" \
          "$layout" --arms "$arms" --steps "${REAL_STEPS:-$steps}" --warmup "${REAL_WARMUP:-3}" --no-merge --no-profile \
          --arm-timeout "$((limit + ${REAL_WARMUP:-3}))" \
          2>&1 | tee "$OUT/$tag-$name.txt" | grep "^|" | tee -a "$OUT/summary.txt"
      done ;;
    variants)
      arms=${VARIANT_ARMS:-bare-fresh,ftw,ftw~sync,ftw~no-autocast,ftw~no-clip+no-clocks,ftw~sync+no-autocast+no-clip+no-clocks}
      for shape in llama-1b:8:90 llama-8b:4:150; do
        IFS=: read -r name mbs limit <<<"$shape"
        [[ ",$SHAPES," == *",$name,"* ]] || continue
        for round in $(seq "${VARIANT_ROUNDS:-1}"); do
          log "gpu_train $name, --unpacked, round $round: ${arms//,/, }"
          samples=${HOST_SAMPLES:+$HOST_SAMPLES/$name-$round}  # each round's py-spy samples in a folder of their own
          HOST_SAMPLES=$samples $PY bench/gpu_train.py --out "$OUT/variants-$name-$round" --work "/tmp/variants-$name" \
            --shape "$name" --mbs "$mbs" --unpacked --arms "$arms" --steps "${REAL_STEPS:-30}" \
            --warmup "${REAL_WARMUP:-40}" --no-merge --no-profile --arm-timeout "$((limit + ${REAL_WARMUP:-40}))" 2>&1 \
            | tee "$OUT/variants-$name-$round.txt" | grep "^|" | tee -a "$OUT/summary.txt"
          if [ -n "$samples" ]; then  # the sampled steps are the warmup's and the timed ones, against the bare loop
            base=bare-fresh
            [[ ",$arms," == *",bare-fresh,"* ]] || base=${arms%%,*}
            $PY bench/host_samples.py "$samples" --steps "$((${REAL_WARMUP:-40} + ${REAL_STEPS:-30}))" --base "$base" \
              >"$OUT/host-samples-$name-$round.md" 2>&1
            head -n 1 "$OUT/host-samples-$name-$round.md" | tee -a "$OUT/summary.txt"
          fi
          arms=$(tr , '\n' <<<"$arms" | tac | paste -sd,)  # the next round in the other order
        done
      done ;;
    masked | unpacked | dropout | int8)
      [ "$part" = masked ] && how="--full-length --prompt-share 0.5" arms=unsloth,ftw,ftw-all-rows
      [ "$part" = unpacked ] && how="--unpacked --replay" arms=${UNPACKED_ARMS:-unsloth,ftw,ftw-padded}
      [ "$part" = dropout ] && how="--full-length --lora-dropout 0.05" arms=${DROPOUT_ARMS:-unsloth,ftw,ftw-peft-lora}
      [ "$part" = int8 ] && how="--full-length --8bit" arms=${INT8_ARMS:-unsloth,ftw,ftw-peft-lora}
      for shape in llama-1b:10:150 llama-8b:8:160; do  # Unsloth's first import on a fresh machine compiles
        IFS=: read -r name steps limit <<<"$shape"
        [[ ",$SHAPES," == *",$name,"* ]] || continue
        log "train_throughput $name $how: $arms"
        # shellcheck disable=SC2086  # $how: several options
        $PY bench/train_throughput.py $how --warmup 3 --shapes "$name" --arms "$arms" --steps "$steps" \
          --arm-timeout "$limit" --json "$OUT/$part-$name.json" 2>"$OUT/$part-$name.stderr" \
          | tee "$OUT/$part-$name.txt" | grep "^|" | tee -a "$OUT/summary.txt"
      done ;;
    profile)
      for name in ${SHAPES//,/ }; do
        log "profile $name: $ARMS (three steps each under torch.profiler: prof-$name-gcoff*.txt, kernels by GPU time)"
        # shellcheck disable=SC2086  # $PROFILE_HOW: several options
        $PY bench/train_throughput.py ${PROFILE_HOW:---full-length} --warmup 3 --shapes "$name" --arms "$ARMS" \
          --steps 6 --arm-timeout 160 --profile "$OUT/prof" 2>"$OUT/prof-$name.stderr" | tee "$OUT/prof-$name.txt" \
          | grep "^|" | tee -a "$OUT/summary.txt"
        log "host_waits $name: the CUDA runtime's and driver's calls in those steps, the longest with their torch op"
        $PY bench/host_waits.py "$OUT"/prof-"$name"-gc*.trace.json.gz 2>&1 | tee -a "$OUT/prof-$name.txt" \
          | tee -a "$OUT/summary.txt" | head -n 45
      done ;;
    1b) throughput llama-1b 12 150 ;;  # Unsloth's first import on a fresh machine compiles for over a minute
    8b) throughput llama-8b 10 160 ;;
    qlora8b | qlora1b)
      shape=llama-${part#qlora}
      log "qlora $shape, checkpointing $QLORA_GC: $QLORA_ARMS"
      $PY bench/qlora.py --out "$OUT/qlora-$shape-$QLORA_GC" --shape "$shape" --gc "$QLORA_GC" \
        --arms "$QLORA_ARMS" --steps 8 --warmup 3 --arm-timeout 200 2>&1 \
        | tee "$OUT/qlora-$shape-$QLORA_GC.txt" | grep "^|" | tee -a "$OUT/summary.txt" ;;
    joined)
      for shape in llama-1b:2:150 llama-8b:1:300; do  # mbs 1-2 × 8 accumulated, axolotl's examples' usual shape
        IFS=: read -r name mbs limit <<<"$shape"
        [[ ",$SHAPES," == *",$name,"* ]] || continue
        log "gpu_train $name, --unpacked, mbs $mbs × 8 accumulated: ftw-unjoined, ftw"
        $PY bench/gpu_train.py --out "$OUT/joined-$name" --work "/tmp/joined-$name" --shape "$name" --mbs "$mbs" \
          --accum 8 --unpacked --arms ftw-unjoined,ftw --steps 6 --warmup 2 --no-merge --no-profile \
          --arm-timeout "$limit" 2>&1 | tee "$OUT/joined-$name.txt" | grep "^|" | tee -a "$OUT/summary.txt"
      done ;;
    offload)
      for shape in llama-1b:8:8:150 llama-8b:4:6:150; do  # Unsloth's 1B arm ran past 80 s on a fresh H100
        IFS=: read -r name mbs steps limit <<<"$shape"
        [[ ",$SHAPES," == *",$name,"* ]] || continue
        log "offloaded checkpointing $name: ftw (real path), unsloth"
        { $PY bench/gpu_train.py --out "$OUT/offload-$name" --work "/tmp/offload-$name" --shape "$name" --mbs "$mbs" \
            --full-length --arms ftw --gc offload --steps "$steps" --warmup 2 --no-merge --no-profile \
            --arm-timeout "$limit"
          $PY bench/train_throughput.py --shapes "$name" --arms unsloth --gc on --offload --full-length \
            --steps "$steps" --warmup 2 --arm-timeout "$limit"; } 2>&1 | tee "$OUT/offload-$name.txt" | grep "^|" \
          | tee -a "$OUT/summary.txt"
      done ;;
    compiles)
      for shape in ${SHAPES//,/ }; do
        log "parallel_compile $shape: the warm-up's kernels compiled one after another and side by side"
        $PY bench/parallel_compile.py --shape "$shape" --seq 2048 --mbs 4 --workers 1,4,8,15 2>&1 \
          | tee -a "$OUT/compiles.txt" | grep -E "^\||specialisations" | tee -a "$OUT/summary.txt"
      done ;;
    ab)
      log "tree_ab $AB_SHAPES against $OLD, checkpointing $AB_GC"
      olds=() && for tree in ${OLD//,/ }; do olds+=(--old "$tree"); done
      $PY bench/tree_ab.py "${olds[@]}" --site "$FTW_SITE" --shapes "$AB_SHAPES" --gc "$AB_GC" --rounds "$AB_ROUNDS" --steps 12 \
        --lora-dropout "$AB_DROPOUT" ${AB_UNPACKED:+--unpacked} \
        2>&1 | tee "$OUT/ab.txt" | tail -n 8 >>"$OUT/summary.txt" ;;
    *) log "unknown part '$part' (tests, ops, dropout-ops, real, real-unpacked, masked, unpacked, dropout, int8," \
         "offload, joined, variants, 1b, 8b, qlora8b, qlora1b, profile, gemms, new-shapes, algos, rank-grads, compiles, ab)"; exit 2 ;;
  esac
done

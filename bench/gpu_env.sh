# Sourced by bench/gpu_*.sh on the device machine: Python, PYTHONPATH, and what the image lacks
# installed offline from the wheels bench/gpu_wheels.py built ($FTW_WHEELS, default .whl) into a
# folder put first on PYTHONPATH. `ensure_imports "import a, b"` stops the script (exit 1) when
# the modules still cannot be imported: a job always goes through handler.py, never around it.
# `record_host` writes the machine beside the GPU to $OUT/env.txt. Needs OUT and a `log` function.
PY=${PYTHON:-python3}
WHEELS=${FTW_WHEELS:-.whl}
SITE=${FTW_SITE:-/tmp/ftw-site}
export PYTHONPATH="$(pwd):$(pwd)/kernels:$SITE${PYTHONPATH:+:$PYTHONPATH}"  # kernels/: the package ftw_kernels
export PATH="$SITE/bin:$PATH"  # the wheels' scripts (py-spy, for bench/host_samples.py)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

ensure_imports() {
  $PY -c "$1" 2>/dev/null && return 0
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "FAILED: this Python lacks ftw's worker packages and there are no wheels in $WHEELS (build them with bench/gpu_wheels.py and carry the folder)"
    exit 1
  fi
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (offline)"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1 \
    || { log "FAILED: pip install from $WHEELS (see pip.log)"; tail -n 20 "$OUT/pip.log"; exit 1; }
  if ! $PY -c "$1" >"$OUT/import.log" 2>&1; then
    log "FAILED: the worker still cannot import what it needs (see import.log)"; tail -n 20 "$OUT/import.log"; exit 1
  fi
}

# The machine beside the GPU, into $OUT/env.txt, and one line of it logged: short steps are paced by the host's
# launches, and a 1B layer's took 3.9 to 10 ms on H100 machines, 3.2 and 6.8 on two H200 ones (docs/benchmarks.md,
# "seventeenth session", "eighteenth session"), so a figure from them needs its host named. CPUs this process may run on, the CPU model,
# each GPU's NUMA node and the CPUs local to it.
record_host() {
  local cpus model gpus=""
  cpus=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
  model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] && [ -f "$d/local_cpulist" ] || continue
    case $(cat "$d/class") in 0x0300* | 0x0302*) ;; *) continue ;; esac  # display and 3D controllers: not audio
    gpus+="${gpus:+; }${d##*/} node $(cat "$d/numa_node") cpus $(cat "$d/local_cpulist")"
  done
  { nvidia-smi -L; echo "cpus allowed: $cpus ($(nproc))"; echo "cpu: $model"; echo "gpus: $gpus"; nvidia-smi topo -m; } \
    >"$OUT/env.txt" 2>&1
  log "host: $model, cpus $cpus ($(nproc)); ${gpus:-no GPU found on the PCI bus}"
}

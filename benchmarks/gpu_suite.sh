#!/usr/bin/env bash
# The one call on the H200 test machine (../shared/GPU.md): tests and measures fastperc within a
# time budget, writing to OUTPUT_DIR as it goes, so that a call cut at any moment leaves results.
#
#   benchmarks/gpu_suite.sh [--dry-run] OUTPUT_DIR
#
# Phases, in priority order, each under `timeout` (SIGINT, SIGKILL 10 s later) for the smaller of
# its cap and the budget left:
#   env         nvidia-smi, versions, CPUs, the VGG-16 ImageNet file in the torch hub cache
#   install     pip install -e . without the CUDA extension (FASTPERC_BUILD_CUDA=0); tqdm from
#               benchmarks/wheels where missing. Then the extension builds in the background
#               (phase cuda_build: just in time, CUDA_HOME from nvcc's real location, MAX_JOBS
#               jobs); its failure is never fatal: the cuda tests and rows are then absent
#   tests       the test modules with CUDA cases (-k "not cpu": the CPU cases run in CI), in parallel
#               with pytest-xdist, a per-test timeout (pytest-timeout); JUnit XML
#   cuda_tests  waits for the extension, then tests/test_cuda_kernels.py, tests/test_cuda_backend.py
#   ops         fastperc bench per op: eager, triton, cuda; the first shape of every op in bf16,
#               then in fp32, before the second shapes
#   e2e         the training step and inference: pytorch/examples eager and fastperc, bf16 and fp32
#   compile     the torch.compile baselines with the time left, bf16 first, one shape per op first
# then finish (fastperc.bench.suite): results.json (the bench document with tests and phases),
# chart.png and the table on stdout. A bench phase's --deadline is its timeout less its slack
# (time to start Python and finish the last measurement), so it ends on its own.
#
# OUTPUT_DIR (new or empty) holds at most 8 files at any time: suite.log (what every phase
# printed), cuda_build.log, phases.jsonl (one line per phase), rows.jsonl (every benchmark row,
# streamed), tests.xml, tests_cuda.xml, results.json, chart.png.
#
# Environment: FASTPERC_SUITE_BUDGET seconds for the whole script (default 520; 90 dry);
# FASTPERC_SUITE_CAPS "phase=seconds ..." overrides caps; FASTPERC_SUITE_SLACK "phase=seconds|off
# ..." overrides slacks (off: no --deadline, the timeout cuts the phase); FASTPERC_TESTS the test
# modules of the tests phase; PYTHON (default python3).
# --dry-run: the same phases on the CPU, with small caps and selections and no install
# (tests/test_gpu_suite.py runs it in make test).
set -uo pipefail

dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: benchmarks/gpu_suite.sh [--dry-run] OUTPUT_DIR" >&2; exit 2; fi
mkdir -p "$1" 2>/dev/null && out=$(cd "$1" && pwd) || { echo "gpu_suite.sh: cannot create $1" >&2; exit 2; }
if [ -n "$(ls -A "$out")" ]; then echo "gpu_suite.sh: $out is not empty (the suite appends to its files)" >&2; exit 2; fi
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
work=$(mktemp -d)
log=$out/suite.log
start=$SECONDS
reserve=25  # for finish
if [ $dry = 1 ]; then
  device=cpu budget=${FASTPERC_SUITE_BUDGET:-90}
  default_caps="env=20 cuda_build=60 tests=40 cuda_tests=30 ops=20 e2e=15 compile=15"
  default_slack="ops=3 e2e=13 compile=15"  # e2e: one measurement; compile: none (slow on a CPU)
  tests=${FASTPERC_TESTS:-tests/test_kernel_source.py tests/test_tv_loss.py::test_training_shapes_on_gpu}
  test_filter=()
  e2e=(--quick --ops inference --dtypes fp32) compile=(--quick)
else
  device=cuda budget=${FASTPERC_SUITE_BUDGET:-520}
  default_caps="env=30 install=150 cuda_build=300 tests=180 cuda_tests=90 ops=170 e2e=80 compile=600"
  default_slack="ops=20 e2e=25 compile=40"
  tests=${FASTPERC_TESTS:-}
  if [ -z "$tests" ]; then  # the modules with CUDA cases: they use the device helpers of tests/
    for f in $(grep -lE 'backend_device_params|TRITON_DEVICE|ON_GPU|DEVICES|op_table' tests/test_*.py); do
      case $f in tests/test_cuda_kernels.py|tests/test_cuda_backend.py) ;; *) tests="$tests $f" ;; esac
    done
  fi
  test_filter=(-k "not cpu")
  e2e=(--ops train_step,inference --dtypes bf16,fp32) compile=()
fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTPERC_CACHE_DIR=$work/fastperc-cache  # where the extension is built just in time
build_jobs=4

lookup() {  # lookup NAME "k=v ..." DEFAULT: the value of NAME in the list, else DEFAULT
  local kv
  for kv in ${2//,/ }; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done
  echo "$3"
}
cap() { lookup "$1" "${FASTPERC_SUITE_CAPS:-}" "$(lookup "$1" "$default_caps" 60)"; }
slack() { lookup "$1" "${FASTPERC_SUITE_SLACK:-}" "$(lookup "$1" "$default_slack" 0)"; }
allot() {  # allot NAME: seconds for phase NAME, the smaller of its cap and what the budget leaves
  local c left
  c=$(cap "$1") left=$((budget - (SECONDS - start) - reserve - 10))
  left=$((left > 0 ? left : 0))
  echo $((c < left ? c : left))
}
say() { echo "[suite $((SECONDS - start))s] $*" | tee -a "$log"; }
record() {  # record NAME STATUS SECONDS NOTE (the note kept JSON-safe: no quotes, backslashes, controls)
  local note
  note=$(printf '%s' "${4:-}" | tr -d '\\\000-\037' | tr '"' "'")
  printf '{"name": "%s", "status": "%s", "seconds": %d, "note": "%s"}\n' "$1" "$2" "$3" "$note" \
    >>"$out/phases.jsonl"
  say "phase $1: $2 after $3 s${4:+ ($4)}"
}
status_of() { case $1 in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac; }

run_phase() {  # run_phase NAME SECONDS COMMAND...: COMMAND under timeout, its output in suite.log
  local name=$1 t=$2 t0=$SECONDS rc=0 mark
  shift 2
  if [ "$t" -lt 5 ]; then record "$name" skipped 0 "no time left"; return 1; fi
  say "phase $name: up to $t s: $*"
  mark=$(wc -l <"$log")
  timeout -s INT -k 10 "$t" "$@" >>"$log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then tail -n +"$((mark + 2))" "$log" | tail -n 15; fi
  record "$name" "$(status_of $rc)" $((SECONDS - t0)) "exit $rc"
  return $rc
}

bench_phase() {  # bench_phase NAME ARGS...: fastperc bench, its rows appended to rows.jsonl
  local name=$1 t s d deadline=()
  shift
  t=$(allot "$name") s=$(slack "$name")
  if [ "$s" != off ]; then d=$((t - s)); deadline=(--deadline $((d > 0 ? d : 0))); fi
  run_phase "$name" "$t" "$PY" -m fastperc bench --device "$device" ${deadline[@]+"${deadline[@]}"} \
    --jsonl "$out/rows.jsonl" "$@"
}

environment() {
  date -u +"date %FT%TZ"; uname -srm; echo "cpus $(nproc)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not found"
  echo "CUDA_HOME ${CUDA_HOME:-unset}"
  "$PY" - <<'EOF'
import importlib.metadata as md, os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
for name in ("triton", "pytest", "pytest-xdist", "pytest-timeout", "tqdm", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB")
vgg = os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")
print("VGG-16 ImageNet weights in the torch hub cache:", "yes" if os.path.isfile(vgg) else "no", vgg)
EOF
}

install() {
  FASTPERC_BUILD_CUDA=0 "$PY" -m pip install --no-deps --no-build-isolation -e . || return 1
  "$PY" -c "import tqdm" 2>/dev/null || "$PY" -m pip install --no-deps --no-index benchmarks/wheels/tqdm-*.whl \
    || echo "tqdm not installed: fastperc bench runs without its progress bar"
}

cuda_home() {  # the CUDA toolkit nvcc belongs to (a wrapper on PATH may live elsewhere)
  local here
  here=$(nvcc -v --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  [ -n "$here" ] && [ -d "$here/.." ] && (cd "$here/.." && pwd)
}

pytest_phase() {  # pytest_phase NAME JUNIT WORKERS MODULES...
  local name=$1 junit=$2 workers=$3 args=(-q -rfE --tb=short -p no:cacheprovider --durations=15)
  shift 3
  if [ $# -eq 0 ]; then record "$name" skipped 0 "no test modules"; return 1; fi
  if "$PY" -c "import xdist" 2>/dev/null; then
    args+=(-n "$workers" --dist "$("$PY" -c "import xdist; v = tuple(map(int, xdist.__version__.split('.')[:2])); print('worksteal' if v >= (3, 2) else 'load')")")
  fi
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 240)
  run_phase "$name" "$(allot "$name")" "$PY" -m pytest "$@" ${test_filter[@]+"${test_filter[@]}"} "${args[@]}" \
    --junitxml="$junit"
}

export -f environment install
export PY
touch "$log"
say "fastperc GPU suite: device $device, budget $budget s, output $out$( [ $dry = 1 ] && echo ', dry run')"

home=$(cuda_home) && export CUDA_HOME=$home
run_phase env "$(allot env)" bash -c environment
if [ $dry = 1 ]; then record install skipped 0 "dry run"; else run_phase install "$(allot install)" bash -c install; fi

# The extension builds in the background while the tests run.
(
  t=$(allot cuda_build)
  MAX_JOBS=$build_jobs timeout -k 10 $((t > 5 ? t : 5)) "$PY" -m fastperc.bench.suite build-cuda \
    >"$out/cuda_build.log" 2>&1 &
  echo $! >"$work/cuda_build.pid"
  wait $!
  echo $? >"$work/cuda_build.rc"
) &
build_t0=$SECONDS

cpus=$(nproc)
# shellcheck disable=SC2086  # $tests: a list of modules
pytest_phase tests "$out/tests.xml" $((cpus > build_jobs + 1 ? cpus - build_jobs : 1)) $tests

wait_left=$(allot cuda_tests)
while [ ! -f "$work/cuda_build.rc" ] && [ "$wait_left" -gt 20 ]; do sleep 1; wait_left=$((wait_left - 1)); done
if [ -f "$work/cuda_build.rc" ]; then
  rc=$(cat "$work/cuda_build.rc")
else  # not done in time: cut it, so that it competes with no measurement
  kill -TERM "$(cat "$work/cuda_build.pid")" 2>/dev/null
  rc=cut
fi
note=$(tail -n 1 "$out/cuda_build.log" 2>/dev/null | cut -c1-200)
case $rc in 0) status=ok ;; cut) status=timeout ;; *) status=$(status_of "$rc") ;; esac
record cuda_build "$status" $((SECONDS - build_t0)) "$note"
if [ "$status" = ok ]; then
  pytest_phase cuda_tests "$out/tests_cuda.xml" $((cpus > 8 ? 8 : cpus)) tests/test_cuda_kernels.py tests/test_cuda_backend.py
else
  export FASTPERC_CUDA_JIT=0  # nothing builds it again, nothing waits on the cut build
  { echo "--- cuda_build.log (last 30 lines)"; tail -n 30 "$out/cuda_build.log"; } >>"$log" 2>/dev/null
  record cuda_tests skipped 0 "no extension"
fi

bench_phase ops --no-end-to-end --providers eager,triton,cuda --dtypes bf16,fp32
# torch: the fused network's backend on a CPU (the dry run); on CUDA it runs triton.
bench_phase e2e --providers eager,torch,triton,cuda "${e2e[@]}"
bench_phase compile --providers compile --dtypes bf16,fp32 ${compile[@]+"${compile[@]}"}

left() { local t=$((budget - (SECONDS - start))); echo $((t > 10 ? t : 10)); }
timeout -k 5 "$(left)" "$PY" -m fastperc.bench.suite finish "$out" 2>&1 | tee -a "$log"
if [ -f "$out/results.json" ]; then
  timeout -k 5 "$(left)" "$PY" benchmarks/plot.py "$out/results.json" "$out/chart.png" >>"$log" 2>&1 \
    || say "chart: not drawn (see suite.log)"
fi
rm -rf "$work"
say "done; commit results.json and chart.png under benchmarks/results/"
exit 0

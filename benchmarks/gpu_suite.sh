#!/usr/bin/env bash
# The one command for the H200 test machine (../shared/GPU.md):
#   [FASTPERC_TESTS="tests/..."] benchmarks/gpu_suite.sh OUTPUT_DIR [all|tests|bench]
# installs fastperc (building the CUDA extension for sm_90; tqdm from benchmarks/wheels where
# missing), runs the test suite on CUDA (scikit-image comparisons skip there: it is not installed),
# then `fastperc bench` in full, and leaves the results JSON, the chart and the logs in
# OUTPUT_DIR. Commit the JSON and the chart under benchmarks/results/.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUTPUT_DIR [all|tests|bench]}
phase=${2:-all}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python3 -m pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
  || { tail -n 30 "$out/install.log"; exit 1; }
# The machine lacks tqdm (the command's progress bars): a pure-Python wheel travels with the repo.
python3 -c "import tqdm" 2>/dev/null \
  || python3 -m pip install --no-deps --no-index benchmarks/wheels/tqdm-*.whl >>"$out/install.log" 2>&1 \
  || { tail -n 30 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1 || true
status=0
if [ "$phase" = all ] || [ "$phase" = tests ]; then
  # FASTPERC_TESTS narrows the run (e.g. "tests/test_gram.py tests/test_cuda_kernels.py") to fit
  # one device call; the Triton kernels compile on first use, which is most of the time here.
  # shellcheck disable=SC2086
  python3 -m pytest ${FASTPERC_TESTS:-tests} -q -p no:cacheprovider --durations=15 2>&1 | tee "$out/tests.log" \
    || status=1
fi
if [ "$phase" = all ] || [ "$phase" = bench ]; then
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  python3 -m fastperc bench --device cuda --out "$out/h200-$stamp.json" 2>&1 | tee "$out/bench.log"
  python3 benchmarks/plot.py "$out/h200-$stamp.json" "$out/h200-$stamp.png"
fi
exit $status

#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the test suite with CUDA available,
# then the GPU benchmark.  Writes logs and tables to $OUT (default benchmarks/results/gpu).
# Usage (device tool): carry .whl (torchdeq/mnist1d wheels), then  bash benchmarks/gpu_run.sh
# Stages can be skipped: SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1; BENCH_ARGS="--only dispatch".
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; nvcc --version | tail -2; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  t0=$(date +%s)
  DYNALAY_BUILD_CUDA=1 DYNALAY_BUILD_CPP=1 DYNALAY_CUDA_ARCHS=${DYNALAY_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
    timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "error|registers|spill" "$OUT/build.log" | head -40
fi
python3 -m dynalay info 2>&1 | tee -a "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest ${TEST_PATHS:-tests} -q -m "not slow" -p no:cacheprovider --maxfail=30 \
    ${TEST_ARGS:-} > "$OUT/gpu-tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - t0 )) s"; tail -25 "$OUT/gpu-tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench-stdout.log" 2>&1
  echo "bench rc=$?"; grep -A200 "^# dynalay GPU" "$OUT/bench-stdout.log" | head -120
fi

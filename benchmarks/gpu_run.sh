#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, sweep the Triton launch configurations
# (and profile forward+backward), run the GPU tests with the chosen configuration, then the GPU
# benchmark: first the issues' targets (gpu_targets.py: a fresh process, providers interleaved),
# then the full table (gpu_bench.py).  Logs and tables go to $OUT (default benchmarks/results/gpu).
# Usage (device tool): carry .whl (the torchdeq wheel), then  bash benchmarks/gpu_run.sh
# Stages: SKIP_BUILD=1 SKIP_TUNE=1 SKIP_TESTS=1 SKIP_TARGETS=1 SKIP_BENCH=1; TEST_PATHS, TARGETS_ARGS,
# BENCH_ARGS, TUNE_ARGS, *_TIMEOUT;
# TUNED_ENV='export ...' replays the choices of an earlier tune stage (written to $OUT/tuned.env).
# TOTAL_S: a wall budget for the whole script; every stage's timeout is cut to what is left of it.
# Within a 15-minute device budget (session 15: a machine starts in ~30 s; build ~100 s, GPU tests
# ~90 s, targets ~100 s):
#   TOTAL_S=540 SKIP_TUNE=1 TEST_PATHS="tests/test_gpu.py tests/test_gpu_cuda.py" \
#     BENCH_ARGS="--B 8192 --only fixed_point" bash benchmarks/gpu_run.sh
set -u
T_END=$(( $(date +%s) + ${TOTAL_S:-100000} ))
tl() { local left=$(( T_END - $(date +%s) - 5 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
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
    timeout $(tl ${BUILD_TIMEOUT:-240}) python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - t0 )) s"; grep -E " error|registers|spill" "$OUT/build.log" | head -20
fi
python3 -m dynalay info 2>&1 | tee -a "$OUT/env.txt"
if [ "${SKIP_TUNE:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout $(tl ${TUNE_TIMEOUT:-200}) python3 benchmarks/gpu_tune.py --out "$OUT" --env-out "$OUT/tuned.env" \
    ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
  echo "tune rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "chosen|failed|PROFILE|cuda variant" "$OUT/tune.log" | cut -c1-400
fi
[ -f "$OUT/tuned.env" ] && . "$OUT/tuned.env" && cp "$OUT/tuned.env" /tmp/dynalay_tuned.env
if [ -n "${TUNED_ENV:-}" ]; then eval "$TUNED_ENV"; fi
export DYNALAY_TRITON_FAST_CONFIG DYNALAY_TRITON_TILED_CONFIG DYNALAY_CUDA_SOLVE 2>/dev/null
echo "DYNALAY_TRITON_FAST_CONFIG=${DYNALAY_TRITON_FAST_CONFIG:-default} DYNALAY_TRITON_TILED_CONFIG=${DYNALAY_TRITON_TILED_CONFIG:-default} DYNALAY_CUDA_SOLVE=${DYNALAY_CUDA_SOLVE:-default}" | tee -a "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout $(tl ${TEST_TIMEOUT:-240}) python3 -m pytest ${TEST_PATHS:-tests} -q -m "not slow" -p no:cacheprovider -rfEs \
    ${TEST_ARGS:-} > "$OUT/gpu-tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|FAILED|ERROR|Fatal" "$OUT/gpu-tests.log" | tail -25
fi
if [ "${SKIP_TARGETS:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout $(tl ${TARGETS_TIMEOUT:-300}) python3 benchmarks/gpu_targets.py --out "$OUT" ${TARGETS_ARGS:-} > "$OUT/targets.stdout" 2>&1
  echo "targets rc=$? in $(( $(date +%s) - t0 )) s"; sed -n '/^### Targets/,/^Kernels/p' "$OUT/targets.md" 2>/dev/null
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout $(tl ${BENCH_TIMEOUT:-300}) python3 benchmarks/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} > /dev/null 2>&1
  echo "bench rc=$?"; cat "$OUT"/*.md 2>/dev/null | head -80
fi

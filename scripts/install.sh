#!/usr/bin/env bash
# Installs dynalay and everything its tests, benchmarks and main job need, on a fresh CPU machine.
# Uses the torch already installed if there is one; otherwise the CPU wheel torch==2.13.0
# (never an unpinned torch: that would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
# triton is not pulled by the CPU torch wheel; the interpreter runs the Triton kernels on CPU in tests.
$PY -m pip install -q triton numpy pytest pytest-benchmark ninja scikit-learn mnist1d matplotlib tqdm "torchdeq==0.1.0"
# C++ CPU ops built in place (no CUDA needed); the CUDA ops only when a CUDA torch + nvcc exist.
DYNALAY_BUILD_CUDA=${DYNALAY_BUILD_CUDA:-auto} $PY -m pip install -q -e . --no-build-isolation
$PY -m dynalay info

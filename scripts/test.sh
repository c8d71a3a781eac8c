#!/usr/bin/env bash
# Installs (scripts/install.sh), then runs the test suite and a smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
$PY -m pytest tests -q -rs --durations=15
# benchmarks: each case once, untimed (exit code 5 = nothing collected counts as a pass)
$PY -m pytest benchmarks -q --benchmark-disable || [ $? -eq 5 ]

#!/usr/bin/env bash
# Full timed CPU run of both benchmark suites, then the markdown report.
#
#   bash benchmarks/run_cpu.sh [extra pytest args]
#
# Writes benchmarks/results/cpu-<date>.json (pytest-benchmark) and benchmarks/results/cpu-<date>.md
# (report.py: medians and the issues' ratios, PASS/FAIL).  Run it on a quiet machine: the CPU
# timings use 2 threads (DYNALAY_BENCH_THREADS) and every case measures for about
# DYNALAY_BENCH_TARGET_S seconds (1.2 by default); the whole run takes about 6-8 minutes.
# The CPU is benchmarked even on a machine that has a GPU (DYNALAY_BENCH_DEVICE=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

date=$(date +%Y-%m-%d)
out="benchmarks/results/cpu-${date}.json"
mkdir -p benchmarks/results

export DYNALAY_BENCH_DEVICE=cpu
export DYNALAY_BENCH_THREADS="${DYNALAY_BENCH_THREADS:-2}"
export DYNALAY_BENCH_CMD="bash benchmarks/run_cpu.sh${*:+ $*}"

python -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-json "$out" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name \
    "$@"

python benchmarks/report.py "$out" > /dev/null
echo "wrote $out and ${out%.json}.md"

#!/usr/bin/env bash
# Installs (scripts/install.sh), then trains and evaluates DynaLay on MNIST-1D (generated locally)
# with its baselines, writing runs/<name>/ (config.json, seed<k>/checkpoint.pt, report.json,
# accuracy_vs_compute.png, table.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
${PYTHON:-python3} -m dynalay train "$@"

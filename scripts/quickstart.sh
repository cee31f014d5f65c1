#!/usr/bin/env bash
# Set up and run the main job on the bundled InGaN data: train a multi-fidelity
# model (PBE + r2SCAN), then evaluate it at r2SCAN on x = 0.5 cells, a
# composition no r2SCAN training structure has. Outputs go to runs/quickstart.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
WD="${1:-runs/quickstart}"
if [ -f "$WD/checkpoint_last.pth" ]; then
    echo "[quickstart] $WD holds a previous run; remove it or pass another folder" >&2
    exit 1
fi
sevenn_mf train input_templates/quickstart.yaml -w "$WD"
sevenn_mf evaluate "$WD/checkpoint_best.pth" --fidelity r2scan \
    input_templates/quickstart_data/r2scan_test_x0.5.extxyz -o "$WD/eval_r2scan_x0.5"

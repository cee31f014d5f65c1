#!/usr/bin/env bash
# Set up and run the main job on the bundled InGaN data: SevenNet-0 fine-tuned
# (a) as a multi-fidelity model, PBE + r2SCAN with coupled fidelity heads, and
# (b) on the r2SCAN data alone, with the same budget (input_templates/quickstart.yaml),
# then both compared at r2SCAN on x = 0.5 cells, a composition no r2SCAN
# training structure has. Outputs in runs/quickstart (or the folder given).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup_env.sh
WD="${1:-runs/quickstart}"
if [ -e "$WD/mf" ] || [ -e "$WD/hf-only" ]; then
    echo "[quickstart] $WD holds a previous run; remove it or pass another folder" >&2
    exit 1
fi
mkdir -p "$WD"
start=$(date +%s)
# one core each: the two trainings run side by side
export OMP_NUM_THREADS=1
echo "[quickstart] training both models (logs: $WD/*/*/log.sevenn_mf) ..." >&2
sevenn_mf train input_templates/quickstart.yaml --method mf -w "$WD/mf" -q \
    > "$WD/mf.out" 2>&1 &
mf=$!
sevenn_mf train input_templates/quickstart.yaml --method hf-only -w "$WD/hf-only" -q \
    > "$WD/hf-only.out" 2>&1 &
hf=$!
rc=0
wait $mf || { rc=1; cat "$WD/mf.out" >&2; }
wait $hf || { rc=1; cat "$WD/hf-only.out" >&2; }
[ $rc -eq 0 ] || exit 1
export OMP_NUM_THREADS=2
sevenn_mf compare "$WD/mf" "$WD/hf-only" \
    --labels "multi-fidelity (PBE + r2SCAN)" "r2SCAN only" \
    --files input_templates/quickstart_data/r2scan_test_x0.5.extxyz \
    -o "$WD/compare"
echo "[quickstart] done in $(( $(date +%s) - start )) s (both trained from 7net-0, 80 steps each)" >&2

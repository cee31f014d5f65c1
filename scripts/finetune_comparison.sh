#!/usr/bin/env bash
# Issue #5's comparison on ../shared/data/ingan, r2SCAN errors on hf_test_dev:
#  (a) 7net-0 fine-tuned on r2SCAN alone, (b) 7net-0 -> multi-fidelity PBE + r2SCAN
#  (input_templates/finetune_7net0.yaml), (c) the same architecture from scratch.
# Same optimizer, epochs and structures per epoch for all three; CPU wall times.
#   bash scripts/finetune_comparison.sh [OUT=runs/finetune_cmp]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-runs/finetune_cmp}")"
SHARED="${SEVENN_MF_SHARED:-$REPO/../shared}"
TEST="$SHARED/data/ingan/hf_test_dev_r2scan.extxyz"
mkdir -p "$OUT"
T="$REPO/input_templates/finetune_7net0.yaml"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python3 - "$T" "$OUT" "$SHARED" <<'PY'
import sys, yaml, copy, os
src, out, shared = sys.argv[1:]
b = yaml.safe_load(open(src))
for db in b['data']['databases']:
    db['files'] = os.path.join(shared, 'data', 'ingan', os.path.basename(db['files']))
a = copy.deepcopy(b)  # r2SCAN alone: 7net-0's fidelity renamed, no replay
a['train'].update(pretrained_fidelity='r2scan')
for k in ('pretrained_add', 'fit_new_references', 'shared_lr_factor'):
    a['train'].pop(k, None)
a['data']['databases'] = [d for d in a['data']['databases'] if d['fidelity'] == 'r2scan']
a['data']['reference_energies'] = {'r2scan': 'fit_to_pretrained'}
a['data']['sampling'] = {'mode': 'explicit', 'ratios': {'ingan_r2scan': 1.0},
                         'epoch_length': b['data']['sampling']['epoch_length']}
c = copy.deepcopy(b)  # the same architecture (SevenNet-0's) from scratch
for k in ('pretrained', 'pretrained_fidelity', 'pretrained_add', 'fit_new_references',
          'shared_lr_factor'):
    c['train'].pop(k, None)
c['data'].pop('reference_energies', None)
c['model'].update({'chemical_species': 'auto', 'cutoff': 5.0, 'channel': 128,
                   'lmax': 2, 'num_convolution_layer': 5, 'is_parity': False,
                   'weight_nn_hidden_neurons': [64, 64],
                   'radial_basis': {'radial_basis_name': 'bessel', 'bessel_basis_num': 8},
                   'cutoff_function': {'cutoff_function_name': 'XPLOR', 'cutoff_on': 4.5},
                   'self_connection_type': 'linear'})
c['train']['optim_param'] = {'lr': 0.005}
for name, cfg in (('a_r2scan_only', a), ('b_mf_from_7net0', b), ('c_scratch', c)):
    with open(os.path.join(out, name + '.yaml'), 'w') as f:
        yaml.safe_dump(cfg, f)
PY
for run in a_r2scan_only b_mf_from_7net0 c_scratch; do
    if [ ! -f "$OUT/$run/checkpoint_best.pth" ]; then
        rm -rf "$OUT/$run"
        start=$(date +%s)
        sevenn_mf train "$OUT/$run.yaml" -w "$OUT/$run" -q
        echo "$run train_seconds $(( $(date +%s) - start ))" | tee -a "$OUT/times.txt"
    fi
    sevenn_mf evaluate "$OUT/$run/checkpoint_best.pth" --fidelity r2scan "$TEST" \
        -o "$OUT/$run/eval" | tee "$OUT/$run/eval.txt"
done

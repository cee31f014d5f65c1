#!/usr/bin/env bash
# Issue #5's comparison on ../shared/data/ingan, r2SCAN errors on hf_test_dev:
#  (a) 7net-0 fine-tuned on r2SCAN alone, (b) 7net-0 -> multi-fidelity PBE + r2SCAN
#  (input_templates/finetune_7net0.yaml), (c) (b)'s model, SevenNet-0's exact
#  architecture, trained from scratch. Same optimizer, epochs and structures per
#  epoch for all three; CPU wall times; plus 7net-0's own forces, untrained.
#   bash scripts/finetune_comparison.sh [OUT=runs/finetune_cmp]
# EPOCHS (default 15) and EPOCH_LENGTH (structures per epoch, default 128) set the
# budget, the same for all three; SEEDS (default "1 2 3") the repeats, each in
# OUT/s<seed>. Finished runs are kept (delete a run's folder to redo it).
# About 6 min per run on 2 cores: 3 seeds x 3 runs ~ 1 h.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-runs/finetune_cmp}")"
SHARED="${SEVENN_MF_SHARED:-$REPO/../shared}"
TEST="$SHARED/data/ingan/hf_test_dev_r2scan.extxyz"
TEST_PBE="$SHARED/data/ingan/hf_test_dev_pbe.extxyz"
T="$REPO/input_templates/finetune_7net0.yaml"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
for seed in ${SEEDS:-1 2 3}; do
    S="$OUT/s$seed"
    mkdir -p "$S"
    python3 - "$T" "$S" "$SHARED" "${EPOCHS:-15}" "${EPOCH_LENGTH:-128}" "$seed" <<'PY'
import sys, yaml, copy, os, warnings
src, out, shared, epochs, epoch_length, seed = sys.argv[1:]
b = yaml.safe_load(open(src))
b['train'].update(epoch=int(epochs), random_seed=int(seed),
                  per_epoch=int(epochs))  # no 10 MB checkpoint every epoch
b['train']['scheduler_param']['total_iters'] = int(epochs)
b['data']['sampling']['epoch_length'] = int(epoch_length)
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
c = copy.deepcopy(b)  # the same model from scratch
for k in ('pretrained', 'pretrained_fidelity', 'pretrained_add', 'fit_new_references',
          'shared_lr_factor'):
    c['train'].pop(k, None)
c['data'].pop('reference_energies', None)
# exactly SevenNet-0's architecture (irreps_manual 128x0e+64x1e+32x2e, ...), read
# from the checkpoint; species, shift, scale and denominator from the data instead
warnings.filterwarnings('ignore')
import sevenn.util
arch = sevenn.util.load_checkpoint(sevenn.util.pretrained_name_to_path('7net-0')).config
c['model'].update({k: arch[k] for k in (
    'cutoff', 'channel', 'irreps_manual', 'lmax', 'lmax_edge', 'lmax_node', 'is_parity',
    'num_convolution_layer', 'radial_basis', 'cutoff_function', 'act_radial',
    'act_scalar', 'act_gate', 'weight_nn_hidden_neurons', 'self_connection_type',
    'interaction_type', 'readout_as_fcn', '_normalize_sph')})
c['model']['chemical_species'] = 'auto'
c['train']['optim_param'] = {'lr': 0.005}  # a from-scratch learning rate
for name, cfg in (('a_r2scan_only', a), ('b_mf_from_7net0', b), ('c_scratch', c)):
    with open(os.path.join(out, name + '.yaml'), 'w') as f:
        yaml.safe_dump(cfg, f)
PY
    for run in a_r2scan_only b_mf_from_7net0 c_scratch; do
        if [ ! -f "$S/$run/checkpoint_best.pth" ]; then
            rm -rf "$S/$run"
            start=$(date +%s)
            sevenn_mf train "$S/$run.yaml" -w "$S/$run" -q
            sed -i "/^$run /d" "$S/times.txt" 2>/dev/null || true
            echo "$run train_seconds $(( $(date +%s) - start ))" | tee -a "$S/times.txt"
        fi
        [ -f "$S/$run/eval/summary.csv" ] || sevenn_mf evaluate \
            "$S/$run/checkpoint_best.pth" --fidelity r2scan "$TEST" -o "$S/$run/eval" \
            > "$S/$run/eval.txt"
    done
    # did the replayed PBE fidelity of (b) stay where 7net-0 was? (same cells at PBE)
    [ -f "$S/b_mf_from_7net0/eval_pbe/summary.csv" ] || sevenn_mf evaluate \
        "$S/b_mf_from_7net0/checkpoint_best.pth" --fidelity pbe "$TEST_PBE" \
        -o "$S/b_mf_from_7net0/eval_pbe" > /dev/null
done
# 7net-0 as it is: its forces are what every fine-tuned model starts from (its
# energies have VASP's zero, not GPAW's, and are not compared)
[ -f "$OUT/zero_shot_7net0/eval/summary.csv" ] || \
    sevenn_mf evaluate 7net-0 "$TEST" -o "$OUT/zero_shot_7net0/eval" > /dev/null
[ -f "$OUT/zero_shot_7net0/eval_pbe/summary.csv" ] || \
    sevenn_mf evaluate 7net-0 "$TEST_PBE" -o "$OUT/zero_shot_7net0/eval_pbe" > /dev/null
python3 "$REPO/scripts/finetune_comparison_report.py" "$OUT" \
    --figure "${FIGURE:-$OUT/comparison.png}"

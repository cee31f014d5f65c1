#!/usr/bin/env python3
"""Choose the multi-fidelity recipe (coupling weights, fidelity-dependent
positions, layer mode) on the training pools alone, by *extrapolation
validation*.

A random validation split of the high-fidelity (HF) pool lies where the HF
training data lies, so it cannot see what multi-fidelity training is for: the
HF head where only low-fidelity (LF) data exists. Here the HF pool is split
by region instead, the way the real task is: one part trains, the other part
(a region the HF training part does not reach, but the LF data does) scores.

* ``--split x_In``: InGaN. HF trains at x = 0 (GaN cells) and is scored at
  x = 1 (InN), which only the LF (PBE) pool covers besides.
* ``--split strain``: periodic solids. Per composition, the quarter of the
  HF cells whose volume per atom lies furthest from that composition's median
  is scored; the rest trains. The LF pool covers those volumes; the held-out
  part asks whether the HF head follows how the HF - LF difference changes
  with volume (for GGA -> meta-GGA it does: r2SCAN binds tighter).
* ``--split distortion``: molecules. HF structures are ranked by their RMS
  bond-length deviation from the first structure's bonds (a geometric
  measure: no label is used); the most distorted quarter is scored, the rest
  trains.

* ``--heldout FILE ...``: the whole HF pool trains and these files score:
  a surrogate task whose HF labels exist where the real pool has none
  (``scripts/surrogate_fidelity.py``: InGaN at x = 0.5).

Variants may also be ``delta`` or ``transfer``, as references on the same
task (with either kind of split).

No test file is read. Every variant is one ``sevenn_mf.analysis.methods`` run
(resumable), scored on the held-out HF part (energy MAE and signed mean,
force MAE where labelled) next to the LF validation error of the same model.

    OMP_NUM_THREADS=1 python scripts/select_coupling.py \\
        input_templates/ingan_methods.yaml --split x_In \\
        --variants scripts/coupling_variants.yaml -w runs/select_ingan

Variants file: a list of {name, method, model: {...}, train: {...}, mf:
{...}, delta: {...}, hf_weight: {...}} (model / train keys override the
methods YAML, ``mf`` replaces its ``train.mf``, ``delta`` keys are added to
its ``train.delta``, ``hf_weight`` the HF databases' ``weight``;
``method`` is mf, mf-uncoupled or mf-transfer, or, as references on the same
task, delta (with ``train.delta.paired_files``: the training part's PBE
partners are paired by set / index) or transfer).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import time

import numpy as np
import yaml


def bond_deviation(atoms, ref) -> float:
    """RMS deviation (Å) of the bond lengths of ``atoms`` from those of
    ``ref`` (bonds: pairs of ``ref`` within 1.2 x the sum of covalent radii)."""
    from ase.data import covalent_radii

    z = ref.numbers
    d_ref = ref.get_all_distances()
    limit = 1.2 * (covalent_radii[z][:, None] + covalent_radii[z][None, :])
    i, j = np.nonzero(np.triu(d_ref < limit, 1))
    d = atoms.get_all_distances()
    return float(np.sqrt(np.mean((d[i, j] - d_ref[i, j]) ** 2)))


def split_pool(pool, how: str):
    """(train indices, held-out indices) of the HF pool."""
    atoms = [a for _, a in pool]
    if how == 'x_In':
        x = np.array([float(a.info['x_In']) for a in atoms])
        return list(np.flatnonzero(x == x.min())), list(np.flatnonzero(x == x.max()))
    if how == 'strain':
        # volume per atom against the median of its own composition: the
        # quarter most compressed or expanded is held out (no label used)
        formula = [a.get_chemical_formula() for a in atoms]
        v = np.array([a.get_volume() / len(a) for a in atoms])
        strain = np.zeros(len(atoms))
        for f in set(formula):
            idx = [i for i, g in enumerate(formula) if g == f]
            strain[idx] = np.log(v[idx] / np.median(v[idx]))
        cut = np.quantile(np.abs(strain), 0.75)
        return list(np.flatnonzero(np.abs(strain) < cut)), list(
            np.flatnonzero(np.abs(strain) >= cut)
        )
    if how == 'distortion':
        dev = np.array([bond_deviation(a, atoms[0]) for a in atoms])
        cut = np.quantile(dev, 0.75)
        return list(np.flatnonzero(dev < cut)), list(np.flatnonzero(dev >= cut))
    raise SystemExit(f'unknown split {how!r} (x_In, strain, distortion)')


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _heads(lf_files, run_dir, lf, pred) -> dict:
    """The LF head on the held-out structures' LF labels, and the error of
    the heads' gap (HF head - LF head against HF label - LF label): which head
    an HF error comes from, so that two wrong heads do not pass for a right
    gap."""
    if not lf_files:
        return {}
    from sevenn_mf.analysis.learning_curve import lf_parts
    from sevenn_mf.analysis.predict import MethodModel

    nan = float('nan')
    parts = lf_parts(run_dir, lf)
    if parts is None:
        return {
            'heldout_lf_energy_bias': nan,
            'heldout_gap_mae': nan,
            'heldout_gap_bias': nan,
        }
    _, lp = MethodModel(parts).predict_files(lf_files)
    hf_ref, hf_e = np.asarray(pred.e_ref, float), np.asarray(pred.e_pred, float)
    lf_ref, lf_e = np.asarray(lp.e_ref, float), np.asarray(lp.e_pred, float)
    if len(lf_ref) != len(hf_ref):
        raise SystemExit('--heldout-lf must hold the --heldout structures, in order')
    gap_err = (hf_e - lf_e) - (hf_ref - lf_ref)
    return {
        'heldout_lf_energy_bias': 1000 * float(np.nanmean(lf_e - lf_ref)),
        'heldout_gap_mae': 1000 * float(np.nanmean(np.abs(gap_err))),
        'heldout_gap_bias': 1000 * float(np.nanmean(gap_err)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('input', help='methods YAML (sevenn_mf.analysis.methods)')
    p.add_argument(
        '--split', choices=['x_In', 'strain', 'distortion'], help='or --heldout'
    )
    p.add_argument(
        '--heldout',
        nargs='+',
        help='score on these files (HF fidelity) and train on the whole HF pool',
    )
    p.add_argument(
        '--heldout-lf',
        nargs='+',
        help='the same structures as --heldout (same order) at the LF fidelity: '
        "adds the LF head there and the error of the heads' gap",
    )
    p.add_argument('--variants', required=True, help='YAML list of variants')
    p.add_argument('-w', '--working-dir', required=True)
    p.add_argument('--seeds', nargs='+', type=int, default=[1])
    p.add_argument('--only', nargs='+', help='run only these variant names')
    args = p.parse_args()
    if (args.split is None) == (args.heldout is None):
        p.error('give one of --split and --heldout')

    from sevenn_mf.analysis.learning_curve import hf_pool, lf_parts, write_subset
    from sevenn_mf.analysis.methods import read_method_input, run_method
    from sevenn_mf.analysis.predict import MethodModel
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.evaluate import error_summary
    from sevenn_mf.metrics import FidelityMetrics

    mi = read_method_input(args.input)
    with open(args.variants) as f:
        variants = yaml.safe_load(f)
    if args.only:
        variants = [v for v in variants if v['name'] in args.only]
    out = os.path.abspath(args.working_dir)
    os.makedirs(out, exist_ok=True)
    pool = hf_pool(mi)
    if args.heldout:
        train_idx = list(range(len(pool)))
        held_files = [os.path.abspath(f) for f in args.heldout]
        how = ', '.join(held_files)
    else:
        train_idx, held_idx = split_pool(pool, args.split)
        held = write_subset(mi, pool, held_idx, os.path.join(out, 'hf_heldout_part'))
        held_files = [f for fs in held.values() for f in fs]
        how = f'{len(held_idx)} held out ({args.split})'
    files = write_subset(mi, pool, train_idx, os.path.join(out, 'hf_train_part'))
    print(f'HF pool {len(pool)}: {len(train_idx)} train, {how}', flush=True)
    lf = mi.lf_fidelities[0]
    results = os.path.join(out, 'selection.csv')
    rows = []
    for seed in args.seeds:
        for var in variants:
            run_mi = mi.with_hf_files(files)
            run_mi.raw['model'] = _merge(run_mi.raw['model'], var.get('model'))
            run_mi.raw['train'] = _merge(run_mi.raw['train'], var.get('train'))
            run_mi.raw['train']['random_seed'] = seed
            if var.get('hf_weight') is not None:  # the HF databases' loss weights
                for db in run_mi.raw['data']['databases']:
                    if db.get('fidelity') == mi.hf_fidelity:
                        db['weight'] = dict(var['hf_weight'])
            if var.get('mf') is not None:  # train.mf of the methods YAML
                run_mi.mf = dict(var['mf'])
            if var.get('delta') is not None:  # added to its train.delta
                run_mi.delta = dict(run_mi.delta, **var['delta'])
            d = os.path.join(out, var['name'], f's{seed}')
            t0 = time.time()
            res = run_method(
                run_mi,
                var.get('method', 'mf'),
                d,
                resume=True,
                screen=False,
                # LF-only stages (mf with init: lf) do not depend on the
                # split: one per seed, shared by the variants
                shared_dir=os.path.join(out, 'shared'),
                log=lambda s: None,
            )
            model = MethodModel(res.parts)
            _, pred = model.predict_files(held_files)
            err = error_summary(pred)
            ref, e = np.asarray(pred.e_ref), np.asarray(pred.e_pred)
            # the LF head's stage: delta's scaled part A is a copy outside it
            ckpt = (lf_parts(d, lf) or res.parts)[0][0]
            metrics = FidelityMetrics.read_csv(
                os.path.join(os.path.dirname(ckpt), 'metrics.csv')
            )
            best = Checkpoint(ckpt).epoch
            # a last stage without LF data (mf-transfer's HF fine-tune) has
            # no LF validation error of its own: nan, not the stage before's
            lf_row = next(
                (
                    r
                    for r in metrics
                    if int(r['epoch']) == best and r['set'] == f'{lf}_validset'
                ),
                {'energy_mae': 'nan', 'force_mae': 'nan'},
            )
            row = {
                'variant': var['name'],
                'seed': seed,
                'heldout_energy_mae': err['energy MAE (meV/atom)'],
                'heldout_energy_bias': 1000 * float(np.nanmean(e - ref)),
                # without the constant offset (e.g. of an element whose HF
                # reference the training part cannot fix): the energy landscape
                'heldout_energy_mae_centered': 1000
                * float(np.nanmean(np.abs((e - ref) - np.nanmean(e - ref)))),
                'heldout_force_mae': err['force MAE (meV/Å)'],
                'lf_valid_energy_mae': float(lf_row['energy_mae']),
                'lf_valid_force_mae': float(lf_row['force_mae']),
                **_heads(args.heldout_lf, d, lf, pred),
                'epochs': max(int(r['epoch']) for r in metrics),
                'best_epoch': best,
                'seconds': round(res.seconds_total or time.time() - t0),
            }
            rows.append(row)
            print(
                ', '.join(
                    f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}'
                    for k, v in row.items()
                ),
                flush=True,
            )
            with open(results, 'w', newline='') as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                w.writeheader()
                w.writerows(rows)
    print(
        '\n| variant | seed | held-out HF energy MAE (bias) meV/atom | same without '
        'the offset | held-out HF force MAE meV/Å | LF validation energy / force MAE '
        '| epochs (best) | s |'
        + (' held-out LF head bias | gap MAE (bias) |' if args.heldout_lf else '')
    )
    print(
        '|---|---|---|---|---|---|---|---|' + ('---|---|' if args.heldout_lf else '')
    )
    for r in rows:
        print(
            f'| {r["variant"]} | {r["seed"]} | {r["heldout_energy_mae"]:.1f} '
            f'({r["heldout_energy_bias"]:+.1f}) | {r["heldout_energy_mae_centered"]:.1f} | '
            f'{r["heldout_force_mae"]:.0f} | '
            f'{r["lf_valid_energy_mae"]:.1f} / {r["lf_valid_force_mae"]:.0f} | '
            f'{r["epochs"]} ({r["best_epoch"]}) | {r["seconds"]} |'
            + (
                f' {r["heldout_lf_energy_bias"]:+.1f} | {r["heldout_gap_mae"]:.1f} '
                f'({r["heldout_gap_bias"]:+.1f}) |'
                if args.heldout_lf
                else ''
            )
        )


if __name__ == '__main__':
    main()

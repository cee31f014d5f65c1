#!/usr/bin/env python3
"""One round of active learning on ethanol: does choosing the structures to
label at CCSD(T) by the fidelity gap beat choosing them at random?

1. MD (``md-check``) of the multi-fidelity (MF) model at its CCSD(T) head at
   a high temperature, from the HF training geometries: the candidate pool.
   A second set of trajectories (other seeds) gives the *trajectory test
   set*: frames neither choice can pick.
2. K structures by the gap (``select``) and K at random from the same pool.
3. CCSD(T)/cc-pVDZ labels for both and for the trajectory test set
   (``scripts/label_ccsdt.py``: PySCF, cached, resumable).
4. The MF model retrained with each addition (same recipe, same seeds).
5. CCSD(T) errors of the original model and of both retrained ones on the
   large-distortion test set and on the trajectory test set.

    OMP_NUM_THREADS=1 python scripts/active_learning.py \\
        --input input_templates/ethanol_methods.yaml \\
        --model runs/lc_ethanol/runs/mf/n100_s1 -w runs/al_ethanol

Everything is resumable (finished steps are reused). The test sets are read
only in step 5.
"""

from __future__ import annotations

import argparse
import copy
import csv
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(cmd, **kw):
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--input', required=True, help='the methods YAML of the MF model')
    p.add_argument(
        '--model', required=True, help='the MF run (folder) to start from'
    )
    p.add_argument('-w', '--working-dir', required=True)
    p.add_argument('--temperature', type=float, default=1000.0)
    p.add_argument('--steps', type=int, default=2000)
    p.add_argument('--starts', type=int, default=4, help='starting geometries')
    p.add_argument('--seeds', nargs='+', type=int, default=[1, 2])
    p.add_argument('--test-seeds', nargs='+', type=int, default=[11])
    p.add_argument('-k', type=int, default=10)
    p.add_argument('--n-test', type=int, default=20, help='trajectory test frames')
    p.add_argument('--retrain-seeds', nargs='+', type=int, default=[1])
    p.add_argument(
        '--test',
        nargs='+',
        required=True,
        help='labelled CCSD(T) test file(s) (large distortions)',
    )
    args = p.parse_args()

    import numpy as np
    from ase.io import read, write

    from sevenn_mf.analysis.compare import compare
    from sevenn_mf.analysis.methods import read_method_input, run_method
    from sevenn_mf.analysis.predict import read_parts

    wd = os.path.abspath(args.working_dir)
    os.makedirs(wd, exist_ok=True)
    mi = read_method_input(args.input)
    hf = mi.hf_fidelity
    ckpt = read_parts(args.model)[0][0][0]
    hf_files = [f for db in mi.hf_databases for f in _files(db, mi.base_dir)]
    starts = read(hf_files[0], ':')[: args.starts]
    write(os.path.join(wd, 'starts.extxyz'), starts)
    common = [
        '--fidelity',
        hf,
        '--structures',
        os.path.join(wd, 'starts.extxyz'),
        '-T',
        str(args.temperature),
        '--steps',
        str(args.steps),
        '--nve-steps',
        '0',
        '--write-every',
        '10',
    ]
    sm = [sys.executable, '-m', 'sevenn_mf.cli']
    # 1. candidate pool and the trajectory test set
    for name, seeds in (('md_pool', args.seeds), ('md_test', args.test_seeds)):
        if not os.path.isfile(os.path.join(wd, name, 'summary.csv')):
            _run(
                sm
                + ['md-check', ckpt]
                + common
                + ['--seeds', *map(str, seeds), '-o', os.path.join(wd, name)]
            )
    pool = sorted(glob.glob(os.path.join(wd, 'md_pool', '*.extxyz')))
    test_frames = [
        a
        for f in sorted(glob.glob(os.path.join(wd, 'md_test', '*.extxyz')))
        for a in read(f, ':')
    ]
    rng = np.random.default_rng(0)
    pick = rng.choice(
        len(test_frames), size=min(args.n_test, len(test_frames)), replace=False
    )
    traj_test = os.path.join(wd, 'trajectory_test.extxyz')
    if not os.path.isfile(traj_test):
        write(traj_test, [test_frames[i] for i in sorted(pick)])
    # 2. choose
    chosen = {}
    for how, extra in (('gap', []), ('random', ['--random'])):
        out = os.path.join(wd, f'chosen_{how}.extxyz')
        if not os.path.isfile(out):
            _run(
                sm
                + [
                    'select',
                    ckpt,
                    *pool,
                    '--fidelity',
                    hf,
                    '-k',
                    str(args.k),
                    '-o',
                    out,
                ]
                + extra
            )
        chosen[how] = out
    # 3. label
    label = [sys.executable, os.path.join(HERE, 'label_ccsdt.py')]
    cache = os.path.join(wd, 'ccsdt_cache.jsonl')
    labelled = {}
    for how, src in list(chosen.items()) + [('trajectory_test', traj_test)]:
        out = os.path.join(wd, f'labelled_{how}.extxyz')
        if not os.path.isfile(out):
            _run(label + [src, '-o', out, '--cache', cache, '--set', f'al_{how}'])
        labelled[how] = out
    # 4. retrain: the HF pool plus the K new labels
    runs = {'original': [args.model]}
    for how in ('gap', 'random'):
        runs[how] = []
        for seed in args.retrain_seeds:
            new = copy.deepcopy(mi)
            new.raw['data']['databases'].append(
                {
                    'name': f'ccsdt_al_{how}',
                    'fidelity': hf,
                    'files': [labelled[how]],
                    'weight': copy.deepcopy(mi.hf_databases[0].get('weight', {})),
                }
            )
            new.raw['train']['random_seed'] = seed
            d = os.path.join(wd, f'retrain_{how}_s{seed}')
            run_method(new, 'mf', d, resume=True, screen=False)
            runs[how].append(d)
    # 5. evaluate
    rows = []
    for test_name, files in (
        ('large-distortion test', args.test),
        ('trajectory test', [labelled['trajectory_test']]),
    ):
        for how, dirs in runs.items():
            for d in dirs:
                r = compare(
                    [(how, d)],
                    None,
                    files,
                    os.path.join(wd, 'eval', how + '_' + os.path.basename(d)),
                )[0]
                rows.append(
                    {
                        'test': test_name,
                        'model': how,
                        'run': d,
                        'energy_mae': r['energy_mae'],
                        'energy_bias': r['energy_bias'],
                    }
                )
    with open(os.path.join(wd, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(
        '\n| test set | model | CCSD(T) energy MAE (meV/atom), mean over seeds '
        '| bias | runs |'
    )
    print('|---|---|---|---|---|')
    for test_name in ('large-distortion test', 'trajectory test'):
        for how in runs:
            rs = [r for r in rows if r['test'] == test_name and r['model'] == how]
            e = [r['energy_mae'] for r in rs]
            b = [r['energy_bias'] for r in rs]
            print(
                f'| {test_name} | {how} | {np.mean(e):.2f}'
                + (f' ± {np.std(e):.2f}' if len(e) > 1 else '')
                + f' | {np.mean(b):+.2f} | {len(rs)} |'
            )
    with open(os.path.join(wd, 'chosen_scores.json'), 'w') as f:
        json.dump(
            {
                how: [a.info.get('gap_score') for a in read(chosen[how], ':')]
                for how in chosen
            },
            f,
            indent=1,
        )


def _files(db, base):
    fs = db['files'] if isinstance(db['files'], list) else [db['files']]
    return [os.path.join(base, f) for f in fs]


if __name__ == '__main__':
    main()

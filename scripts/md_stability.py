#!/usr/bin/env python3
"""MD stability of several models' high-fidelity (HF) potentials: one
``sevenn_mf md-check`` per model from the same starting structures and seeds,
then one table (stable fraction, time to failure, failure kinds).

    OMP_NUM_THREADS=1 python scripts/md_stability.py -w runs/md_ethanol \\
        --structures ../shared/data/ethanol/hf_train_ccsdt.extxyz --index :4 \\
        -T 800 --steps 1000 --seeds 1 2 \\
        --model hf-only=runs/lc_ethanol_b/runs/hf-only/n100_s1 \\
        --model mf=runs/lc_ethanol_mf/runs/mf/n100_s1 ...

A model is ``NAME=PATH`` with PATH anything md-check takes (a method run's
folder, a checkpoint with ``--fidelity``). Finished models are reused on a
rerun (their ``summary.csv`` exists).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('-w', '--working-dir', required=True)
    p.add_argument('--model', action='append', required=True, metavar='NAME=PATH')
    p.add_argument('--fidelity', help='head to run, for checkpoints of MF models')
    p.add_argument('--structures', nargs='+', required=True)
    p.add_argument('--index', default=':')
    p.add_argument('-T', '--temperature', type=float, required=True)
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--nve-steps', type=int, default=100)
    p.add_argument('--timestep', type=float, default=0.5, help='fs')
    p.add_argument('--seeds', nargs='+', type=int, default=[1, 2])
    args = p.parse_args()

    os.makedirs(args.working_dir, exist_ok=True)
    rows = []
    for spec in args.model:
        name, sep, path = spec.partition('=')
        if not sep or not name or not path:
            p.error(f'--model {spec!r}: expected NAME=PATH')
        out = os.path.join(args.working_dir, name)
        summary = os.path.join(out, 'summary.csv')
        if not os.path.isfile(summary):
            cmd = [sys.executable, '-m', 'sevenn_mf.cli', 'md-check', path]
            cmd += ['--fidelity', args.fidelity] if args.fidelity else []
            cmd += ['--structures', *args.structures, '--index', args.index]
            cmd += ['-T', str(args.temperature), '--steps', str(args.steps)]
            cmd += [
                '--nve-steps',
                str(args.nve_steps),
                '--timestep',
                str(args.timestep),
            ]
            cmd += ['-o', out]
            cmd += ['--seeds', *map(str, args.seeds)]
            print('$ ' + ' '.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        with open(summary) as f:
            for r in csv.DictReader(f):
                rows.append({'model': name, **r})

    with open(os.path.join(args.working_dir, 'stability.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    total_ps = (args.steps + args.nve_steps) * args.timestep / 1000
    print(
        f'\n{args.temperature:g} K, {args.steps} NVT + {args.nve_steps} NVE steps '
        f'({total_ps:g} ps) per trajectory\n'
    )
    print('| model | stable | failures (kind: count) | time to failure, ps (each) |')
    print('|---|---|---|---|')
    for name in dict.fromkeys(r['model'] for r in rows):
        rs = [r for r in rows if r['model'] == name]
        ok = sum(r['stable'] == 'True' for r in rs)
        kinds: dict = {}
        for r in rs:
            if r['stable'] != 'True':
                kinds[r['failure']] = kinds.get(r['failure'], 0) + 1
        times = sorted(float(r['failure_ps']) for r in rs if r['stable'] != 'True')
        print(
            f'| {name} | {ok}/{len(rs)} | '
            + (', '.join(f'{k}: {v}' for k, v in kinds.items()) or '–')
            + ' | '
            + (', '.join(f'{t:.3g}' for t in times) or '–')
            + ' |'
        )


if __name__ == '__main__':
    main()

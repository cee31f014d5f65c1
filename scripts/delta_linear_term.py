#!/usr/bin/env python3
"""Would Δ-learning gain from the same prior as ``coupling.scale: fitted``?

Post-hoc analysis of a finished ``delta`` run of a learning curve (round 15
of docs/benchmarks.md): on the HF *training* structures, the residual of
Δ's prediction (LF model + Δ network) is regressed on the LF model's energy
per atom; the fitted line is then added to Δ's prediction on the test file.
No test label enters the fit. This approximated a Δ variant whose target has
the linear term taken out; round 16 implemented it as ``train.delta: {scale:
fitted}`` (the scale fitted to the paired labels before model B trains). The
script stays to reproduce round 15's numbers.

    OMP_NUM_THREADS=1 python scripts/delta_linear_term.py runs/t15/eth_s1 \\
        --n 100 --seed 1 --test ../shared/data/ethanol/hf_test_dev_ccsdt.extxyz
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
from ase.io import read


def per_atom_energies(frames, calculators) -> np.ndarray:
    """(structures, parts) energies per atom in meV of each part's model."""
    out = []
    for atoms in frames:
        row = []
        for calc in calculators:
            a = atoms.copy()
            a.calc = calc
            row.append(a.get_potential_energy() / len(a))
        out.append(row)
    return 1000 * np.array(out)


def main(argv=None) -> None:
    from sevenn_mf import SevenNetMFCalculator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('curve', help='learning-curve working directory')
    ap.add_argument('--n', type=int, required=True, help='HF set size')
    ap.add_argument('--seed', type=int, required=True)
    ap.add_argument('--test', required=True, help='HF test file (extxyz)')
    args = ap.parse_args(argv)

    run = os.path.join(args.curve, 'runs', 'delta', f'n{args.n}_s{args.seed}')
    parts = json.load(open(os.path.join(run, 'model.json')))['parts']
    calcs = [
        SevenNetMFCalculator(
            os.path.normpath(os.path.join(run, p['checkpoint'])), p['fidelity']
        )
        for p in parts
    ]
    subset = glob.glob(
        os.path.join(args.curve, 'subsets', f's{args.seed}_n{args.n}', '*.extxyz')
    )
    train = [a for f in sorted(subset) for a in read(f, ':')]
    test = read(args.test, ':')
    p_tr, p_te = per_atom_energies(train, calcs), per_atom_energies(test, calcs)
    y_tr = 1000 * np.array([a.get_potential_energy() / len(a) for a in train])
    y_te = 1000 * np.array([a.get_potential_energy() / len(a) for a in test])
    resid, x = y_tr - p_tr.sum(1), p_tr[:, 0]
    design = np.vstack([x, np.ones_like(x)]).T
    coef, *_ = np.linalg.lstsq(design, resid, rcond=None)
    r = resid - design @ coef
    se = np.sqrt(r @ r / (len(r) - 2) / np.sum((x - x.mean()) ** 2))
    plain = p_te.sum(1) - y_te
    linear = p_te.sum(1) + coef[0] * p_te[:, 0] + coef[1] - y_te
    print(
        f'n {args.n} seed {args.seed}: slope {coef[0]:+.4f} ± {se:.4f} on '
        f'{len(train)} training structures; test E MAE (bias) meV/atom: '
        f'delta {np.abs(plain).mean():.2f} ({plain.mean():+.2f}), '
        f'delta + linear term {np.abs(linear).mean():.2f} ({linear.mean():+.2f})'
    )


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""How much the heads' gap of an MF model bows with composition (InGaN).

For each checkpoint: the per-atom gap E(HF head) - E(LF head) averaged over
the pool's cells at x = 0, 0.5 and 1 (x = In / (In + Ga)), and its bowing at
0.5 against the line through the end members, in meV/atom. The pool is a
training file (the PBE pool by default): no test file is needed.

    OMP_NUM_THREADS=1 python scripts/gap_bowing.py RUN/mf/checkpoint_best.pth ...

The true r2SCAN - PBE bowing (+29.8 meV/atom at x = 0.5) comes from the
paired DFT labels: docs/benchmarks.md, "Why coupled MF lost on InGaN".
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def x_in(atoms) -> float:
    s = atoms.get_chemical_symbols()
    n_in, n_ga = s.count('In'), s.count('Ga')
    return round(n_in / (n_in + n_ga), 3) if n_in + n_ga else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('checkpoints', nargs='+')
    p.add_argument('--pool', default='../shared/data/ingan/lf_train_pbe.extxyz')
    p.add_argument('--hf', default='r2scan')
    p.add_argument('--lf', default='pbe')
    args = p.parse_args()

    from ase.io import read

    from sevenn_mf import SevenNetMFCalculator

    frames = [a for a in read(args.pool, ':') if x_in(a) in (0.0, 0.5, 1.0)]
    print(
        '| checkpoint | gap x = 0 | x = 0.5 | x = 1 (eV/atom) | bowing (meV/atom) |'
    )
    print('|---|---|---|---|---|')
    for ck in args.checkpoints:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            calcs = {
                f: SevenNetMFCalculator(ck, f, gap=False) for f in (args.hf, args.lf)
            }
        gaps = {}
        for a in frames:
            e = {}
            for f, c in calcs.items():
                b = a.copy()
                b.calc = c
                e[f] = b.get_potential_energy() / len(b)
            gaps.setdefault(x_in(a), []).append(e[args.hf] - e[args.lf])
        g = {x: float(np.mean(v)) for x, v in gaps.items()}
        bow = 1000 * (g[0.5] - 0.5 * (g[0.0] + g[1.0]))
        print(f'| {ck} | {g[0.0]:.4f} | {g[0.5]:.4f} | {g[1.0]:.4f} | {bow:+.1f} |')


if __name__ == '__main__':
    main()

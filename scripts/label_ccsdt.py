#!/usr/bin/env python3
"""Label molecules with CCSD(T)/cc-pVDZ energies (PySCF), the method of the
project's ethanol data (../shared/datagen/ethanol_pyscf.py: RHF, CCSD, (T),
energy only, conv_tol 1e-10), for the high-fidelity step of active learning.

    OMP_NUM_THREADS=1 python scripts/label_ccsdt.py chosen.extxyz -o labelled.extxyz \\
        [--cache runs/ccsdt_cache.jsonl] [--set al_gap]

Cached and resumable: every finished energy is appended at once to the cache
(one JSON line per structure, keyed by species and positions rounded to
1e-6 Å), so a killed run, or the same structure asked again, costs nothing.
The output keeps each input structure's ``info`` and adds ``fidelity``
(ccsdt), ``set``, ``index`` and ``seconds``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

HARTREE_EV = 27.211386245988


def key(atoms) -> str:
    pos = np.round(np.asarray(atoms.positions, float), 6)
    blob = atoms.numbers.astype(np.int64).tobytes() + pos.tobytes()
    return hashlib.sha256(blob).hexdigest()


def ccsdt_energy(atoms) -> float:
    try:
        from pyscf import cc, gto, scf
    except ImportError:
        sys.exit('label_ccsdt: needs PySCF (pip install pyscf)')
    mol = gto.M(
        atom=[(s, p) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
        basis='cc-pvdz',
        unit='Angstrom',
        verbose=0,
    )
    mf = scf.RHF(mol)
    mf.conv_tol = 1e-10
    mf.kernel()
    if not mf.converged:
        raise RuntimeError('RHF did not converge')
    mycc = cc.CCSD(mf)
    mycc.kernel()
    return float((mycc.e_tot + mycc.ccsd_t()) * HARTREE_EV)


def main() -> None:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read
    from tqdm import tqdm

    from sevenn_mf.data.databases import write_extxyz

    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('input', nargs='+', help='structures (extxyz, ...)')
    p.add_argument('-o', '--output', required=True)
    p.add_argument(
        '--cache', default=os.path.expanduser('~/.cache/sevenn_mf/ccsdt_cache.jsonl')
    )
    p.add_argument('--set', default='al', help="info['set'] of the labelled frames")
    args = p.parse_args()

    frames = [a for f in args.input for a in read(f, ':')]
    cache = {}
    if os.path.isfile(args.cache):
        with open(args.cache) as f:
            for line in f:
                try:
                    d = json.loads(line)
                    cache[d['key']] = d
                except (ValueError, KeyError):
                    pass  # a line cut short by a kill
    os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
    out = []
    for i, a in enumerate(tqdm(frames, desc='CCSD(T)', disable=None)):
        k = key(a)
        if k not in cache:
            t0 = time.time()
            e = ccsdt_energy(a)
            cache[k] = {'key': k, 'energy': e, 'seconds': round(time.time() - t0, 1)}
            with open(args.cache, 'a') as f:
                f.write(json.dumps(cache[k]) + '\n')
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=cache[k]['energy'])
        b.info.update(
            fidelity='ccsdt', set=args.set, index=i, seconds=cache[k]['seconds']
        )
        out.append(b)
    write_extxyz(args.output, out)
    print(f'{len(out)} structures labelled -> {args.output}')


if __name__ == '__main__':
    main()

"""Small labelled databases from ASE's EMT calculator (Cu/Ni, 8 atoms each).

Every structure has the same number of atoms and full energy/force/stress
labels, so per-batch mean losses of equal-sized batches average exactly
(what the DDP test needs). ``high`` is a second "fidelity": EMT scaled by 1.1
and shifted by -0.5 eV/atom.
"""

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write


def emt_frames(n, seed=0, scale=1.0, shift_per_atom=0.0):
    rng = np.random.default_rng(seed)
    out = []
    calc = EMT()
    for _ in range(n):
        a = bulk('Cu', 'fcc', a=3.6, cubic=True).repeat((2, 1, 1))  # 8 atoms
        a.set_chemical_symbols(rng.choice(['Cu', 'Ni'], size=len(a)))
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))
        a.set_cell(a.cell.array @ strain, scale_atoms=True)
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.calc = calc
        e = a.get_potential_energy() * scale + shift_per_atom * len(a)
        f = a.get_forces() * scale
        s = a.get_stress() * scale
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        out.append(a)
    return out


def write_emt(path, n, seed=0, fidelity='low'):
    kw = {'scale': 1.1, 'shift_per_atom': -0.5} if fidelity == 'high' else {}
    write(str(path), emt_frames(n, seed, **kw), format='extxyz')
    return path

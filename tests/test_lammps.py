"""Deployed fidelities in a real LAMMPS (pair_style e3gnn, e3gnn/parallel).

Skips only when no LAMMPS with SevenNet's pair styles is found; build it with
``bash scripts/build_lammps.sh --both`` (the test command does).
"""

import subprocess
import sys

import numpy as np
import pytest
import sevenn._keys as KEY
import torch
from ase.io import read, write
from conftest import QUICKSTART_DATA
from helpers import FIDS, perturbed_model, small_config
from lammps_utils import find_lmp, run_lammps, skip_reason, thermo_table

from sevenn_mf import SevenNetMFCalculator
from sevenn_mf.checkpoint import Checkpoint, save_checkpoint
from sevenn_mf.deploy import deploy, export

LMP = find_lmp('serial')
LMP_MPI = find_lmp('mpi')
pytestmark = pytest.mark.skipif(LMP is None, reason=skip_reason('serial'))

EV_A3_TO_BAR = 1.602176634e6
SPECIES = ['Ga', 'In', 'N']


@pytest.fixture(scope='module')
def mf_checkpoint(tmp_path_factory):
    """A two-fidelity model whose fidelities really differ (indexed mode, with
    perturbed per-fidelity weights)."""
    d = tmp_path_factory.mktemp('mf')
    cfg = small_config('indexed', channel=16, lmax=1)
    cfg[KEY.CUTOFF] = 4.0
    model = perturbed_model(cfg, seed=1, scale=0.1)
    path = d / 'mf.pth'
    save_checkpoint(path, model, cfg)
    return path


@pytest.fixture(scope='module')
def cell64():
    a = read(QUICKSTART_DATA / 'pbe.extxyz', index=5).repeat((2, 2, 2))
    a.calc = None
    return a


def _lammps_frame(atoms, workdir):
    """Write a LAMMPS data file and read it back: LAMMPS rotates the cell to its
    own frame, so the ASE reference is evaluated on the same coordinates."""
    data = workdir / 'data.lmp'
    write(data, atoms, format='lammps-data', specorder=SPECIES, masses=True)
    z_of_type = {i + 1: n for i, n in enumerate([31, 49, 7])}
    back = read(data, format='lammps-data', Z_of_type=z_of_type)
    back.pbc = True
    return back


def _single_point(lmp, pair_style, coeff, workdir, data, nprocs=1):
    layout = 'processors * 1 1' if nprocs > 1 else ''
    text = f"""
units metal
atom_style atomic
boundary p p p
{layout}
read_data {data}
pair_style {pair_style}
pair_coeff * * {coeff} {' '.join(SPECIES)}
thermo_style custom step pe press pxx pyy pzz pxy pxz pyz
thermo_modify format float %20.10f
dump f all custom 1 forces.dump id fx fy fz
dump_modify f sort id format float %20.12f
run 0
"""
    out = run_lammps(lmp, text, workdir, nprocs=nprocs)
    row = thermo_table(out)[-1]
    lines = (workdir / 'forces.dump').read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith('ITEM: ATOMS'))) + 1
    forces = np.array([[float(x) for x in ln.split()[1:4]] for ln in lines[start:]])
    return row, forces


def _ase(ckpt, fidelity, atoms):
    a = atoms.copy()
    a.calc = SevenNetMFCalculator(ckpt, fidelity=fidelity)
    return a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)


@pytest.mark.parametrize('fidelity', FIDS)
def test_serial_matches_calculator(fidelity, mf_checkpoint, cell64, tmp_path):
    atoms = _lammps_frame(cell64, tmp_path)
    (pt,) = deploy(mf_checkpoint, fidelity=fidelity, output=str(tmp_path / 'm.pt'))
    row, f_lmp = _single_point(LMP, 'e3gnn', pt, tmp_path, tmp_path / 'data.lmp')
    e, f, s = _ase(mf_checkpoint, fidelity, atoms)
    n = len(atoms)
    assert abs(row['PotEng'] - e) / n < 1e-5
    assert np.abs(f_lmp - f).max() < 1e-4
    p_lmp = np.array(
        [row['Pxx'], row['Pyy'], row['Pzz'], row['Pxy'], row['Pxz'], row['Pyz']]
    )
    p_ase = (
        -np.array([s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[0, 2], s[1, 2]])
        * EV_A3_TO_BAR
    )
    assert np.abs(p_lmp - p_ase).max() < 10.0  # bar: 1e-3 GPa
    assert np.abs(f).max() > 1e-3


def test_fidelities_differ_in_lammps(mf_checkpoint, cell64, tmp_path):
    atoms = _lammps_frame(cell64, tmp_path)
    paths = deploy(mf_checkpoint, all_fidelities=True, output=str(tmp_path / 'dep'))
    assert [p.rsplit('_', 1)[-1] for p in paths] == ['pbe.pt', 'r2scan.pt']
    energies = []
    for fid, pt in zip(FIDS, paths):
        row, _ = _single_point(
            LMP, 'e3gnn', pt, tmp_path / fid, tmp_path / 'data.lmp'
        )
        energies.append(row['PotEng'])
        assert row['PotEng'] == pytest.approx(
            _ase(mf_checkpoint, fid, atoms)[0], abs=1e-5 * len(atoms)
        )
    assert abs(energies[0] - energies[1]) > 1e-2

    # metadata: sevenn's keys plus ours
    files = {
        'sevenn_mf_fidelity': '',
        'sevenn_mf_fidelities': '',
        'cutoff': '',
        'chemical_symbols_to_index': '',
    }
    torch.jit.load(paths[1], _extra_files=files)
    assert files['sevenn_mf_fidelity'] == b'r2scan'
    assert files['sevenn_mf_fidelities'] == b'pbe r2scan'
    assert files['chemical_symbols_to_index'].split() == [b'Ga', b'In', b'N']


def test_radial_networks_deploy_and_export_exactly(tmp_path, cell64):
    """A model with fidelity radial networks: each deployed fidelity in LAMMPS,
    and its exported plain checkpoint in sevenn's own calculator, equal our
    calculator on the multi-fidelity checkpoint."""
    from sevenn.calculator import SevenNetCalculator

    cfg = small_config('indexed', channel=16, lmax=1)
    cfg[KEY.CUTOFF] = 4.0
    cfg['fidelity_radial'] = True
    ckpt = tmp_path / 'radial.pth'
    save_checkpoint(ckpt, perturbed_model(cfg, seed=2, scale=0.1), cfg)
    atoms = _lammps_frame(cell64, tmp_path)
    paths = deploy(ckpt, all_fidelities=True, output=str(tmp_path / 'dep'))
    energies = []
    for fid, pt in zip(FIDS, paths):
        row, f_lmp = _single_point(
            LMP, 'e3gnn', pt, tmp_path / fid, tmp_path / 'data.lmp'
        )
        e, f, _ = _ase(ckpt, fid, atoms)
        assert abs(row['PotEng'] - e) / len(atoms) < 1e-5
        assert np.abs(f_lmp - f).max() < 1e-4
        energies.append(e)

        plain = export(ckpt, fid, tmp_path / f'plain_{fid}.pth')
        a = atoms.copy()
        a.calc = SevenNetCalculator(str(plain), device='cpu')
        assert a.get_potential_energy() == pytest.approx(e, abs=1e-5 * len(atoms))
        assert np.abs(a.get_forces() - f).max() < 1e-4
    assert abs(energies[0] - energies[1]) > 1e-2


def test_deploy_needs_fidelity(mf_checkpoint, tmp_path):
    from sevenn_mf.model import FidelityError

    with pytest.raises(FidelityError, match='valid: pbe, r2scan'):
        deploy(mf_checkpoint, output=str(tmp_path / 'x.pt'))
    with pytest.raises(FidelityError, match="unknown fidelity 'hse'"):
        deploy(mf_checkpoint, fidelity='hse', output=str(tmp_path / 'x.pt'))


def test_export_roundtrip_through_sevenn_get_model(mf_checkpoint, cell64, tmp_path):
    """The exported plain checkpoint, deployed by sevenn's own CLI in a python
    that never imports sevenn_mf, gives the same LAMMPS numbers."""
    plain = export(mf_checkpoint, 'r2scan', tmp_path / 'plain.pth')
    code = (
        'import sys; from sevenn.main.sevenn_get_model import main; '
        f"sys.argv=['sevenn_get_model', '{plain}', '-o', '{tmp_path / 'sv.pt'}']; "
        "main(); import sys; assert 'sevenn_mf' not in sys.modules"
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path)
    atoms = _lammps_frame(cell64, tmp_path)
    row_sv, f_sv = _single_point(
        LMP, 'e3gnn', tmp_path / 'sv.pt', tmp_path / 'a', tmp_path / 'data.lmp'
    )
    (pt,) = deploy(mf_checkpoint, fidelity='r2scan', output=str(tmp_path / 'mf.pt'))
    row_mf, f_mf = _single_point(
        LMP, 'e3gnn', pt, tmp_path / 'b', tmp_path / 'data.lmp'
    )
    assert row_sv['PotEng'] == pytest.approx(row_mf['PotEng'], abs=1e-6 * len(atoms))
    assert np.abs(f_sv - f_mf).max() < 1e-6

    # and sevenn's own calculator on the plain checkpoint agrees with ours
    from sevenn.calculator import SevenNetCalculator

    a = atoms.copy()
    a.calc = SevenNetCalculator(str(plain), device='cpu')
    e_ref = _ase(mf_checkpoint, 'r2scan', atoms)[0]
    assert a.get_potential_energy() == pytest.approx(e_ref, abs=1e-5 * len(atoms))
    assert Checkpoint(plain).kind == 'plain'


def test_nve_energy_conservation(mf_checkpoint, cell64, tmp_path):
    _lammps_frame(cell64, tmp_path)
    (pt,) = deploy(mf_checkpoint, fidelity='r2scan', output=str(tmp_path / 'm.pt'))
    steps, dt_ps = 1000, 0.0005
    text = f"""
units metal
atom_style atomic
boundary p p p
read_data data.lmp
pair_style e3gnn
pair_coeff * * {pt} {' '.join(SPECIES)}
velocity all create 300.0 4928459 mom yes rot no dist gaussian
timestep {dt_ps}
fix nve all nve
thermo 50
thermo_style custom step temp pe ke etotal
thermo_modify format float %20.10f
run {steps}
"""
    out = run_lammps(LMP, text, tmp_path, timeout=900)
    rows = thermo_table(out)
    etot = np.array([r['TotEng'] for r in rows])
    n = len(cell64)
    t_ps = steps * dt_ps
    slope = np.polyfit(np.linspace(0, t_ps, len(etot)), etot, 1)[0] / n
    fluct = (etot.max() - etot.min()) / n
    print(
        f'\nNVE {steps} steps x {dt_ps * 1000:.1f} fs, {n} atoms: drift '
        f'{slope * 1000:.4f} meV/atom/ps, max excursion {fluct * 1000:.4f} meV/atom, '
        f'T {rows[-1]["Temp"]:.0f} K'
    )
    assert rows[-1]['Temp'] > 10  # it moved
    assert abs(slope) < 1e-3  # eV/atom/ps
    assert fluct < 5e-3


@pytest.mark.skipif(LMP_MPI is None, reason=skip_reason('mpi'))
def test_parallel_two_ranks_match_serial(mf_checkpoint, tmp_path):
    # each rank's slab must be wider than the cutoff: 128 atoms, split along a
    cell = read(QUICKSTART_DATA / 'pbe.extxyz', index=5).repeat((4, 2, 2))
    cell.calc = None
    atoms = _lammps_frame(cell, tmp_path)
    (pt,) = deploy(mf_checkpoint, fidelity='pbe', output=str(tmp_path / 's.pt'))
    (pdir,) = deploy(
        mf_checkpoint, fidelity='pbe', parallel=True, output=str(tmp_path / 'par')
    )
    n_seg = len(list((tmp_path / 'par').glob('deployed_parallel_*.pt')))
    assert n_seg == 2
    row_s, f_s = _single_point(
        LMP, 'e3gnn', pt, tmp_path / 's', tmp_path / 'data.lmp'
    )
    row_p, f_p = _single_point(
        LMP_MPI,
        'e3gnn/parallel',
        f'{n_seg} {pdir}',
        tmp_path / 'p',
        tmp_path / 'data.lmp',
        nprocs=2,
    )
    assert row_p['PotEng'] == pytest.approx(row_s['PotEng'], abs=1e-5 * len(atoms))
    assert np.abs(f_p - f_s).max() < 1e-4
    assert row_p['Press'] == pytest.approx(row_s['Press'], abs=10.0)

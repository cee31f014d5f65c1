"""Every file sevenn_mf writes, read back by sevenn's own loaders.

``export``, ``export --native`` and ``convert`` write checkpoints; ``deploy``,
``deploy --parallel`` and ``deploy-sum`` write TorchScript for LAMMPS. Each
output is read by sevenn itself (``sevenn.util.load_checkpoint(...)
.build_model()``, ``SevenNetCalculator``, sevenn's deploy as in
``sevenn_get_model``, LAMMPS' ``pair_style e3gnn`` / ``e3gnn/parallel``) and
compared with ``SevenNetCalculator`` on the source, for 7net-0 and 7net-mf-0 at
both of its fidelities, on a rattled In-doped GaN cell. These are old
checkpoints (sevenn 0.9.1 / 0.9.4): a written file that kept the source's
version had its already converted weights converted again by every loader.

The LAMMPS tests skip without a LAMMPS that has SevenNet's pair styles (build
it with ``bash scripts/build_lammps.sh --both``).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import sevenn
import torch
from ase.io import read, write
from conftest import QUICKSTART_DATA
from lammps_utils import find_lmp, run_lammps, skip_reason, thermo_table
from sevenn.calculator import SevenNetCalculator
from sevenn.scripts.deploy import deploy as sevenn_deploy
from sevenn.util import load_checkpoint, pretrained_name_to_path

import sevenn_mf  # noqa: F401  (hooks: sevenn then builds converted models)
from sevenn_mf.checkpoint import save_checkpoint
from sevenn_mf.cli import main

LMP = find_lmp('serial')
LMP_MPI = find_lmp('mpi')
needs_lmp = pytest.mark.skipif(LMP is None, reason=skip_reason('serial'))
needs_lmp_mpi = pytest.mark.skipif(LMP_MPI is None, reason=skip_reason('mpi'))

# (pretrained name, fidelity)
SOURCES = {
    '7net-0': ('7net-0', None),
    'mf0-R2SCAN': ('7net-mf-0', 'R2SCAN'),
    'mf0-PBE': ('7net-mf-0', 'PBE'),
}
SPECIES = ['Ga', 'In', 'N']
E_TOL = 1e-5  # eV/atom (float32 models)
F_TOL = 1e-4  # eV/Å
# config entries sevenn derives from an old version on loading
# (patch_old_config): a written file with the new version must hold them
OLD_VERSION_KEYS = (
    'conv_denominator',
    'train_denominator',
    '_normalize_sph',
    'cutoff_function',
)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('writers')


@pytest.fixture(scope='module')
def cell(work):
    """A rattled 32-atom Ga12In4N16 wurtzite cell, written as LAMMPS data and
    read back (LAMMPS turns the cell into its own frame, so every reader sees
    the same coordinates)."""
    a = read(QUICKSTART_DATA / 'pbe.extxyz', index=0).repeat((1, 2, 2))
    a.calc = None
    a.rattle(0.05, seed=1)
    data = work / 'data.lmp'
    write(data, a, format='lammps-data', specorder=SPECIES, masses=True)
    back = read(data, format='lammps-data', Z_of_type={1: 31, 2: 49, 3: 7})
    back.pbc = True
    assert back.get_chemical_formula() == 'Ga12In4N16'
    return back, data


def _evaluate(calc, atoms):
    a = atoms.copy()
    a.calc = calc
    return a.get_potential_energy(), np.asarray(a.get_forces())


@pytest.fixture(scope='module')
def reference(cell):
    """sevenn's calculator on the source, per source key (computed once)."""
    cache = {}

    def get(key):
        if key not in cache:
            name, fid = SOURCES[key]
            cache[key] = _evaluate(SevenNetCalculator(name, modal=fid), cell[0])
        return cache[key]

    return get


def _assert_matches(result, ref, n, what):
    (e, f), (e_ref, f_ref) = result, ref
    assert abs(e - e_ref) / n < E_TOL, f'{what}: {e} vs {e_ref} eV'
    df = np.abs(np.asarray(f) - f_ref).max()
    assert df < F_TOL, f'{what}: forces differ by up to {df} eV/Å'
    assert np.abs(f_ref).max() > 0.1  # a rattled cell: a real force check


def _cli(*args):
    assert main([str(a) for a in args]) == 0


def _fid_args(fid):
    return ['--fidelity', fid] if fid else []


def _lammps(cell, coeff, workdir, style='e3gnn', lmp=None):
    """Energy and forces (ordered as the data file) of one LAMMPS run 0."""
    # a short skin keeps the ghost cutoff (cutoff + skin) below the cell's
    # widths, which e3gnn/parallel needs on one rank
    text = f"""
units metal
atom_style atomic
boundary p p p
read_data {cell[1]}
neighbor 0.3 bin
pair_style {style}
pair_coeff * * {coeff} {' '.join(SPECIES)}
thermo_style custom step pe
thermo_modify format float %20.10f
dump f all custom 1 forces.dump id fx fy fz
dump_modify f sort id format float %20.12f
run 0
"""
    out = run_lammps(lmp or LMP, text, workdir)
    energy = thermo_table(out)[-1]['PotEng']
    lines = (Path(workdir) / 'forces.dump').read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith('ITEM: ATOMS')))
    forces = np.array(
        [[float(x) for x in ln.split()[1:4]] for ln in lines[start + 1 :]]
    )
    assert len(forces) == len(cell[0])
    return energy, forces


# ---- checkpoint writers ------------------------------------------------------------
@pytest.fixture(scope='module')
def exported(work):
    """``sevenn_mf export SOURCE [--fidelity F] -o plain.pth`` (once per source)."""
    cache = {}

    def get(key):
        if key not in cache:
            name, fid = SOURCES[key]
            out = work / f'export_{key}.pth'
            _cli('export', name, *_fid_args(fid), '-o', out)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope='module')
def native(work):
    out = work / 'native_mf0.pth'
    _cli('export', '7net-mf-0', '--native', '-o', out)
    return out


@pytest.fixture(scope='module')
def converted(work):
    """``sevenn_mf convert``: 7net-mf-0 with a renamed and an added fidelity;
    7net-0 made two-fidelity. {name: path}"""
    mf = work / 'convert_mf0.pth'
    _cli('convert', '7net-mf-0', '-o', mf, '--rename', 'R2SCAN=r2scan')
    # a written file as the source: its weights must not be converted again
    mf_added = work / 'convert_mf0_hse.pth'
    _cli('convert', mf, '-o', mf_added, '--add', 'hse=PBE')
    plain = work / 'convert_7net0.pth'
    _cli(
        'convert', '7net-0', '-o', plain, '--source-fidelity', 'pbe',
        '--add', 'r2scan=pbe', '--mode', 'indexed',
    )  # fmt: skip
    return {'mf0': mf, 'mf0_hse': mf_added, '7net0': plain}


# (converted file, fidelity in it, source key it must equal)
CONVERTED_CASES = {
    'mf0:r2scan': ('mf0', 'r2scan', 'mf0-R2SCAN'),
    'mf0_hse:hse': ('mf0_hse', 'hse', 'mf0-PBE'),
    '7net0:pbe': ('7net0', 'pbe', '7net-0'),
    '7net0:r2scan': ('7net0', 'r2scan', '7net-0'),
}


@pytest.mark.parametrize('key', SOURCES)
def test_export_read_by_sevenn(key, exported, reference, cell):
    cp = load_checkpoint(str(exported(key)))
    # the weights are in this sevenn's layout: its version, so that no loader
    # converts them again
    assert cp.config['version'] == sevenn.__version__
    assert not cp.config.get('use_modality', False)
    source = load_checkpoint(SOURCES[key][0]).config
    for k in OLD_VERSION_KEYS:
        assert cp.config[k] == source[k], k
    calc = SevenNetCalculator(cp.build_model(), file_type='model_instance')
    got = _evaluate(calc, cell[0])
    _assert_matches(got, reference(key), len(cell[0]), f'export {key}')


def test_save_checkpoint_given_the_stored_old_config(work):
    """The config exactly as 7net-0 stores it (0.9.1: no conv_denominator,
    the XPLOR cutoff's unused p value): the written file says explicitly what
    the old version implied, and sevenn loads exactly 7net-0's model."""
    stored = torch.load(
        pretrained_name_to_path('7net-0'), map_location='cpu', weights_only=False
    )['config']
    assert stored['version'] == '0.9.1' and 'conv_denominator' not in stored
    source = load_checkpoint('7net-0')
    model = source.build_model()
    out = work / 'raw_config.pth'
    save_checkpoint(out, model, stored)
    cp = load_checkpoint(str(out))
    assert cp.config['version'] == sevenn.__version__
    for k in OLD_VERSION_KEYS:
        assert cp.config[k] == source.config[k], k
    back = cp.build_model().state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize('key', ['mf0-R2SCAN', 'mf0-PBE'])
def test_export_native_read_by_sevenn(key, native, reference, cell):
    fid = SOURCES[key][1]
    assert load_checkpoint(str(native)).config['version'] == sevenn.__version__
    got = _evaluate(SevenNetCalculator(str(native), modal=fid), cell[0])
    _assert_matches(got, reference(key), len(cell[0]), f'export --native {fid}')


@pytest.mark.parametrize('case', CONVERTED_CASES)
def test_convert_read_by_sevenn(case, converted, reference, cell):
    name, fid, key = CONVERTED_CASES[case]
    path = converted[name]
    assert load_checkpoint(str(path)).config['version'] == sevenn.__version__
    got = _evaluate(SevenNetCalculator(str(path), modal=fid), cell[0])
    _assert_matches(got, reference(key), len(cell[0]), f'convert {case}')


# ---- the same files through sevenn's deploy (sevenn_get_model) and LAMMPS ------------
@needs_lmp
@pytest.mark.parametrize('key', SOURCES)
def test_export_sevenn_get_model_lammps(key, exported, reference, cell, tmp_path):
    pt = tmp_path / 'sevenn.pt'
    sevenn_deploy(str(exported(key)), fname=str(pt))
    got = _lammps(cell, pt, tmp_path)
    _assert_matches(got, reference(key), len(cell[0]), f'export {key} in LAMMPS')


@needs_lmp
@pytest.mark.parametrize('key', ['mf0-R2SCAN', 'mf0-PBE'])
def test_export_native_sevenn_get_model_lammps(
    key, native, reference, cell, tmp_path
):
    fid = SOURCES[key][1]
    pt = tmp_path / 'sevenn.pt'
    sevenn_deploy(str(native), fname=str(pt), modal=fid)
    got = _lammps(cell, pt, tmp_path)
    _assert_matches(got, reference(key), len(cell[0]), f'native {fid} in LAMMPS')


@needs_lmp
@pytest.mark.parametrize('case', ['mf0_hse:hse', '7net0:r2scan'])
def test_convert_sevenn_get_model_lammps(case, converted, reference, cell, tmp_path):
    name, fid, key = CONVERTED_CASES[case]
    pt = tmp_path / 'sevenn.pt'
    sevenn_deploy(str(converted[name]), fname=str(pt), modal=fid)
    got = _lammps(cell, pt, tmp_path)
    _assert_matches(got, reference(key), len(cell[0]), f'convert {case} in LAMMPS')


# ---- TorchScript writers -------------------------------------------------------------
@needs_lmp
@pytest.mark.parametrize('key', SOURCES)
def test_deploy_lammps(key, reference, cell, tmp_path):
    name, fid = SOURCES[key]
    pt = tmp_path / 'deployed.pt'
    _cli('deploy', name, *_fid_args(fid), '-o', pt)
    got = _lammps(cell, pt, tmp_path)
    _assert_matches(got, reference(key), len(cell[0]), f'deploy {key}')


@needs_lmp_mpi
@pytest.mark.parametrize('key', SOURCES)
def test_deploy_parallel_lammps(key, reference, cell, tmp_path):
    name, fid = SOURCES[key]
    out = tmp_path / 'parallel'
    _cli('deploy', name, *_fid_args(fid), '--parallel', '-o', out)
    n_seg = len(list(out.glob('deployed_parallel_*.pt')))
    assert n_seg == 5  # 7net-0 and 7net-mf-0: five interaction layers
    got = _lammps(
        cell, f'{n_seg} {out}', tmp_path, style='e3gnn/parallel', lmp=LMP_MPI
    )
    _assert_matches(got, reference(key), len(cell[0]), f'deploy --parallel {key}')


@needs_lmp
def test_deploy_sum_lammps(reference, cell, tmp_path):
    """One file = 7net-0 + 7net-mf-0 (R2SCAN) + 7net-mf-0 (PBE)."""
    pt = tmp_path / 'sum.pt'
    parts = ['7net-0', '7net-mf-0@R2SCAN', '7net-mf-0@PBE']
    _cli('deploy-sum', *[a for p in parts for a in ('--part', p)], '-o', pt)
    refs = [reference(k) for k in SOURCES]
    total = (sum(r[0] for r in refs), sum(r[1] for r in refs))
    got = _lammps(cell, pt, tmp_path)
    _assert_matches(got, total, len(cell[0]), 'deploy-sum')


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path, umask):
    """Checkpoints, written databases and graph caches are written to a
    private temporary file and renamed; the result must still have the mode
    any file the user creates gets (readable by the group under umask 022),
    or a colleague's LAMMPS run cannot read the model."""
    import stat

    from sevenn_mf.checkpoint import atomic_torch_save
    from sevenn_mf.data.databases import write_extxyz
    from sevenn_mf.data.graphs import _save_cache

    old = os.umask(umask)
    try:
        atomic_torch_save({'x': torch.zeros(2)}, tmp_path / 'a.pth')
        write_extxyz(
            str(tmp_path / 'b.extxyz'), read(QUICKSTART_DATA / 'pbe.extxyz', ':2')
        )
        _save_cache(str(tmp_path / 'c.pt'), [])
        (tmp_path / 'plain').write_text('x')
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / 'plain').stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ('a.pth', 'b.extxyz', 'c.pt'):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name

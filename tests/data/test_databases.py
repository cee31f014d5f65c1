"""Data layer: database specs, reading, validation, graphs, cache, references."""

import os
import shutil
import warnings
from pathlib import Path

import ase.io
import numpy as np
import pytest
import sevenn._keys as KEY
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from sevenn_mf.data import (
    DataError,
    Frame,
    as_univ_list,
    build_graphs,
    cache_key,
    fit_reference_energies,
    force_rms,
    parse_databases,
    read_frames,
    split_validation,
    validate_frames,
)
from sevenn_mf.data import graphs as graphs_mod

SHARED = Path(
    os.environ.get(
        'SEVENN_MF_SHARED', Path(__file__).resolve().parents[2].parent / 'shared'
    )
)
DATA = SHARED / 'data'
needs_data = pytest.mark.skipif(
    not (DATA / 'ingan').is_dir(),
    reason=f'shared data not found at {DATA} (set SEVENN_MF_SHARED)',
)


# ---- helpers ---------------------------------------------------------------------
def _cell(i, n_rattle=0.05):
    atoms = bulk('GaN', 'wurtzite', a=3.19, c=5.19)
    atoms.rattle(n_rattle, seed=i)
    return atoms


def _labelled(atoms, energy=-10.0, forces=None, stress=None):
    kw = {'energy': energy}
    kw['forces'] = np.full((len(atoms), 3), 0.1) if forces is None else forces
    if stress is not None:
        kw['stress'] = stress
    atoms.calc = SinglePointCalculator(atoms, **kw)
    return atoms


def _write(path, frames):
    ase.io.write(path, frames, format='extxyz')
    return str(path)


def _good_frames(n=5):
    return [_labelled(_cell(i), energy=-10.0 - i) for i in range(n)]


# ---- specs -----------------------------------------------------------------------
@needs_data
def test_parse_databases_globs_relative_paths_and_defaults():
    raw = [
        {'fidelity': 'pbe', 'files': 'ingan/lf_*.extxyz'},
        {
            'name': 'hf',
            'fidelity': 'r2scan',
            'files': ['ingan/hf_train_r2scan.extxyz'],
            'weight': {'energy': 7},
            'validation': {'ratio': 0.1, 'seed': 3},
            'reader': {'format': 'extxyz'},
        },
    ]
    lf, hf = parse_databases(raw, base_dir=str(DATA))
    assert lf.name == 'lf_train_pbe'
    assert lf.files == [str(DATA / 'ingan' / 'lf_train_pbe.extxyz')]
    assert lf.weight == {'energy': 1.0, 'force': 1.0, 'stress': 1.0}
    assert lf.reader == {'index': ':'} and lf.role == 'train'
    assert hf.weight == {'energy': 7.0, 'force': 1.0, 'stress': 1.0}
    assert hf.validation == {'ratio': 0.1, 'seed': 3}
    assert hf.reader == {'format': 'extxyz', 'index': ':'}


@pytest.mark.parametrize(
    'entry, expected',
    [
        ({'name': 'x', 'files': 'a.extxyz'}, "database 'x' has no fidelity"),
        ({'name': 'x', 'fidelity': 'f', 'files': 'nope*.extxyz'}, 'no file matches'),
        (
            {'name': 'x', 'fidelity': 'f', 'files': 'a.extxyz', 'wieght': 1},
            'allowed keys: name, fidelity, files',
        ),
        (
            {
                'name': 'x',
                'fidelity': 'f',
                'files': 'a.extxyz',
                'weight': {'forces': 2},
            },
            "unknown weight key(s) 'forces'",
        ),
        (
            {
                'name': 'x',
                'fidelity': 'f',
                'files': 'a.extxyz',
                'validation': {'ratio': 1.5},
            },
            'ratio must be in (0, 1)',
        ),
        (
            {
                'name': 'x',
                'fidelity': 'f',
                'files': 'a.extxyz',
                'validation': {'files': 'a.extxyz'},
            },
            'both a training and a validation',
        ),
    ],
)
def test_parse_databases_errors(tmp_path, entry, expected):
    _write(tmp_path / 'a.extxyz', _good_frames(1))
    with pytest.raises(DataError) as err:
        parse_databases([entry], base_dir=str(tmp_path))
    assert expected in str(err.value)
    if expected == 'no file matches':
        assert str(tmp_path / 'nope*.extxyz') in str(err.value)
        assert "(database 'x')" in str(err.value)


def test_parse_databases_duplicate_names(tmp_path):
    _write(tmp_path / 'a.extxyz', _good_frames(1))
    raw = [{'fidelity': 'f', 'files': 'a.extxyz'}] * 2
    with pytest.raises(DataError, match="duplicate database name.*'a'"):
        parse_databases(raw, base_dir=str(tmp_path))


# ---- real data: partial labels ----------------------------------------------------
@needs_data
def test_ingan_r2scan_has_forces_but_no_stress():
    frames = read_frames(DATA / 'ingan' / 'hf_train_r2scan.extxyz')
    assert len(frames) == 80
    validate_frames(frames, species=['Ga', 'In', 'N'])
    graphs = build_graphs(frames[:8], 5.0, 'r2scan', {'energy': 7.0})
    for g, f in zip(graphs, frames):
        assert torch.isnan(g[KEY.STRESS]).all()
        assert torch.isfinite(g[KEY.FORCE]).all()
        assert torch.isfinite(g[KEY.ENERGY])
        assert g[KEY.DATA_MODALITY] == 'r2scan'
        assert g[KEY.DATA_WEIGHT] == {'energy': 7.0, 'force': 1.0, 'stress': 1.0}
        assert g[KEY.INFO] == {'file': f.file, 'frame': f.index}
    assert frames[0].present == {'energy': True, 'force': True, 'stress': False}


@needs_data
def test_ethanol_ccsdt_has_energy_only():
    frames = read_frames(DATA / 'ethanol' / 'hf_train_ccsdt.extxyz')
    validate_frames(frames, species=['C', 'H', 'O'])
    graphs = build_graphs(frames[:5], 5.0, 'ccsdt')
    for g in graphs:
        assert torch.isfinite(g[KEY.ENERGY])
        assert torch.isnan(g[KEY.FORCE]).all()
        assert torch.isnan(g[KEY.STRESS]).all()


@needs_data
def test_stress_uses_sevenn_convention():
    path = DATA / 'ingan' / 'lf_train_pbe.extxyz'
    frame = read_frames(path, index='3')[0]
    ase_stress = ase.io.read(path, index=3).get_stress()  # xx yy zz yz xz xy
    assert frame.index == 3
    np.testing.assert_allclose(frame.stress, -ase_stress[[0, 1, 2, 5, 3, 4]])


@needs_data
def test_mixed_fidelity_batch_collates_for_sevenn_loss():
    from torch_geometric.loader import DataLoader

    pbe = build_graphs(
        read_frames(DATA / 'ingan' / 'hf_train_pbe.extxyz', index=':2'),
        5.0,
        'pbe',
        1.0,
    )
    r2 = build_graphs(
        read_frames(DATA / 'ingan' / 'hf_train_r2scan.extxyz', index=':2'),
        5.0,
        'r2scan',
        7.0,
    )
    batch = next(iter(DataLoader(pbe + r2, batch_size=4)))
    assert batch[KEY.DATA_MODALITY] == ['pbe', 'pbe', 'r2scan', 'r2scan']
    w = batch[KEY.DATA_WEIGHT]['energy']
    assert w.shape == (4,) and w.tolist() == [1.0, 1.0, 7.0, 7.0]
    assert batch[KEY.STRESS].shape == (4, 6)
    assert torch.isnan(batch[KEY.STRESS][2:]).all()
    assert torch.isfinite(batch[KEY.STRESS][:2]).all()


# ---- bad files -------------------------------------------------------------------
def test_truncated_file_names_file_and_frame(tmp_path):
    path = _write(tmp_path / 'trunc.extxyz', _good_frames(5))
    lines = Path(path).read_text().splitlines(keepends=True)
    per_frame = len(lines) // 5
    keep = lines[: 3 * per_frame + 3]  # frame 3's header and one atom line
    Path(path).write_text(''.join(keep) + lines[3 * per_frame + 3][:20])
    with pytest.raises(DataError) as err:
        read_frames(path)
    assert 'trunc.extxyz, frame 3' in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / 'empty.extxyz'
    path.write_text('')
    with pytest.raises(DataError, match=r'empty\.extxyz.*empty'):
        read_frames(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match='gone.extxyz: no such file'):
        read_frames(tmp_path / 'gone.extxyz')


def test_nan_energy_is_an_error(tmp_path):
    frames = _good_frames(4)
    _labelled(frames[2], energy=float('nan'))
    frames = read_frames(_write(tmp_path / 'nan.extxyz', frames))
    with pytest.raises(DataError) as err:
        validate_frames(frames)
    msg = str(err.value)
    assert 'nan.extxyz, frame 2: energy' in msg and 'NaN' in msg
    assert 'frame 1' not in msg


def test_inf_force_is_an_error(tmp_path):
    frames = _good_frames(3)
    forces = np.full((len(frames[1]), 3), 0.1)
    forces[2, 1] = np.inf
    _labelled(frames[1], forces=forces)
    frames = read_frames(_write(tmp_path / 'inf.extxyz', frames))
    with pytest.raises(DataError, match=r'inf\.extxyz, frame 1: forces contain inf'):
        validate_frames(frames)


def test_partially_nan_forces_are_an_error(tmp_path):
    frames = _good_frames(3)
    forces = np.full((len(frames[0]), 3), 0.1)
    forces[0, 0] = np.nan
    _labelled(frames[0], forces=forces)
    frames = read_frames(_write(tmp_path / 'part.extxyz', frames))
    with pytest.raises(DataError, match=r'frame 0: forces are NaN in 1 of 12'):
        validate_frames(frames)


def test_close_atoms_are_an_error(tmp_path):
    frames = _good_frames(5)
    pos = frames[3].get_positions()
    pos[1] = pos[0] + [0.3, 0.0, 0.0]
    close = _labelled(Atoms(frames[3].symbols, pos, cell=frames[3].cell, pbc=True))
    frames[3] = close
    frames = read_frames(_write(tmp_path / 'bad.extxyz', frames))
    with pytest.raises(DataError) as err:
        validate_frames(frames, min_distance=0.5)
    assert str(err.value) == (
        f'{tmp_path / "bad.extxyz"}, frame 3: '
        'atoms 0 and 1 are 0.30 Å apart (< 0.5 Å)'
    )
    validate_frames(frames, min_distance=0.25)  # threshold is honoured


def test_close_atoms_across_periodic_boundary(tmp_path):
    atoms = _labelled(
        Atoms('N2', [[0.1, 1, 1], [4.8, 1, 1]], cell=[5, 5, 5], pbc=True)
    )
    frames = read_frames(_write(tmp_path / 'pbc.extxyz', [atoms]))
    with pytest.raises(DataError, match='atoms 0 and 1 are 0.30 Å apart'):
        validate_frames(frames)


def test_unknown_element(tmp_path):
    frames = _good_frames(4)
    xe = Atoms('Xe2', [[0, 0, 0], [2, 2, 2]], cell=[5, 5, 5], pbc=True)
    frames[2] = _labelled(xe)
    frames = read_frames(_write(tmp_path / 'xe.extxyz', frames))
    with pytest.raises(DataError) as err:
        validate_frames(frames, species=['In', 'Ga', 'N'])
    assert str(err.value) == (
        f'{tmp_path / "xe.extxyz"}, frame 2: contains Xe, which the model does '
        'not know (species: Ga, In, N)'
    )


def test_structure_without_energy_and_forces(tmp_path):
    frames = _good_frames(2)
    frames[1].calc = None
    frames = read_frames(_write(tmp_path / 'bare.extxyz', frames))
    assert frames[1].present == {'energy': False, 'force': False, 'stress': False}
    with pytest.raises(
        DataError, match='frame 1: has neither an energy nor a force'
    ):
        validate_frames(frames)


def test_forces_without_energy_are_a_partial_label(tmp_path):
    atoms = _cell(0)
    atoms.calc = SinglePointCalculator(atoms, forces=np.full((len(atoms), 3), 0.2))
    frames = read_frames(_write(tmp_path / 'f.extxyz', [atoms]))
    validate_frames(frames)
    assert np.isnan(frames[0].energy) and np.allclose(frames[0].forces, 0.2)


def test_all_problems_are_reported_together(tmp_path):
    frames = _good_frames(4)
    _labelled(frames[0], energy=float('nan'))
    _labelled(frames[3], energy=float('inf'))
    frames = read_frames(_write(tmp_path / 'two.extxyz', frames))
    with pytest.raises(DataError) as err:
        validate_frames(frames)
    msg = str(err.value)
    assert msg.startswith('2 problems') and 'frame 0' in msg and 'frame 3' in msg


def test_label_keys_match_calculator_labels(tmp_path):
    stress = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])
    forces = np.arange(12, dtype=float).reshape(4, 3) / 10
    by_calc = _labelled(_cell(0), energy=-3.0, forces=forces, stress=stress)
    by_key = _cell(0)
    by_key.info.update({'dft_energy': -3.0, 'dft_stress': stress})
    by_key.arrays['dft_forces'] = forces
    no_stress = _cell(1)
    no_stress.info['dft_energy'] = -2.0
    no_stress.arrays['dft_forces'] = forces
    # a stored result without energy next to a keyed energy
    no_stress.calc = SinglePointCalculator(no_stress, forces=forces)
    a = read_frames(_write(tmp_path / 'calc.extxyz', [by_calc]))[0]
    keys = dict(
        energy_key='dft_energy', force_key='dft_forces', stress_key='dft_stress'
    )
    b, c = read_frames(_write(tmp_path / 'keys.extxyz', [by_key, no_stress]), **keys)
    assert a.energy == b.energy == -3.0
    np.testing.assert_allclose(a.forces, b.forces)
    np.testing.assert_allclose(a.stress, b.stress)
    assert c.present['stress'] is False and np.isnan(c.stress).all()
    validate_frames([a, b, c])


# ---- sevenn preprocessed graphs -------------------------------------------------
def test_reads_sevenn_pt_graphs(tmp_path):
    from sevenn.train.graph_dataset import SevenNetGraphDataset

    src = _write(tmp_path / 'src.extxyz', _good_frames(3))
    SevenNetGraphDataset(
        cutoff=4.0, root=str(tmp_path), files=[src], processed_name='g.pt', log=False
    )
    moved = tmp_path / 'elsewhere'
    moved.mkdir()
    for ext in ('pt', 'yaml'):  # sevenn needs the sevenn_data layout; we do not
        shutil.copy(tmp_path / 'sevenn_data' / f'g.{ext}', moved / f'g.{ext}')
    frames = read_frames(moved / 'g.pt')
    ref = read_frames(src)
    validate_frames(frames, species=['Ga', 'N'])
    assert [f.energy for f in frames] == pytest.approx([f.energy for f in ref])
    np.testing.assert_allclose(frames[2].forces, ref[2].forces, atol=1e-6)
    graphs = build_graphs(frames, 4.0, 'pbe', 2.0)
    assert graphs[1][KEY.DATA_WEIGHT]['force'] == 2.0
    with pytest.raises(DataError, match='pre-built graph has cutoff 4.0, not 5.0'):
        build_graphs(frames, 5.0, 'pbe')


# ---- cache ------------------------------------------------------------------------
@needs_data
def test_cache_reuses_graphs_and_rebuilds_changed_files(tmp_path, monkeypatch):
    path = tmp_path / 'r2.extxyz'
    shutil.copy(DATA / 'ingan' / 'hf_train_r2scan.extxyz', path)
    cache = tmp_path / 'cache'
    frames = read_frames(path)
    first = build_graphs(frames, 5.0, 'r2scan', 7.0, cache_dir=str(cache))
    assert len(list(cache.glob('*.pt'))) == 1

    def no_build(*a, **k):
        raise AssertionError('graphs were rebuilt although cached')

    with monkeypatch.context() as m:
        m.setattr(graphs_mod, 'atoms_to_graph_dict', no_build)
        second = build_graphs(frames, 5.0, 'r2scan', 7.0, cache_dir=str(cache))
    for g1, g2 in zip(first, second, strict=True):
        assert set(g1.keys()) == set(g2.keys())
        for k in g1.keys():
            if isinstance(g1[k], torch.Tensor):
                torch.testing.assert_close(
                    g1[k], g2[k], rtol=0, atol=0, equal_nan=True, msg=k
                )
            else:
                assert g1[k] == g2[k], k

    key = cache_key(
        frames, 5.0, 'r2scan', {'energy': 7.0, 'force': 7.0, 'stress': 7.0}
    )
    assert key != cache_key(frames, 5.0, 'r2scan', 1.0)
    assert key != cache_key(frames, 4.5, 'r2scan', 7.0)
    text = path.read_text()
    path.write_text(text.replace('energy=-74.04947240457177', 'energy=-70.0', 1))
    changed = read_frames(path)
    assert cache_key(changed, 5.0, 'r2scan', 7.0) != key
    rebuilt = build_graphs(changed, 5.0, 'r2scan', 7.0, cache_dir=str(cache))
    assert float(rebuilt[0][KEY.ENERGY]) == pytest.approx(-70.0)
    assert float(first[0][KEY.ENERGY]) == pytest.approx(-74.0494724)
    assert len(list(cache.glob('*.pt'))) == 2
    assert not list(cache.glob('*.tmp'))


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    frames = read_frames(_write(tmp_path / 'a.extxyz', _good_frames(2)))
    cache = tmp_path / 'cache'
    build_graphs(frames, 4.0, 'f', cache_dir=str(cache))
    (entry,) = cache.glob('*.pt')
    entry.write_bytes(b'garbage')
    graphs = build_graphs(frames, 4.0, 'f', cache_dir=str(cache))
    assert len(graphs) == 2 and entry.stat().st_size > 100


def test_split_validation_is_deterministic():
    items = list(range(50))
    train, valid = split_validation(items, 0.2, seed=1)
    assert (train, valid) == split_validation(items, 0.2, seed=1)
    assert valid != split_validation(items, 0.2, seed=2)[1]
    assert len(valid) == 10 and sorted(train + valid) == items
    assert train == sorted(train)
    assert len(split_validation([1, 2], 0.01, seed=0)[1]) == 1


# ---- references ----------------------------------------------------------------
def _composition_frames(counts, e_ref, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i, c in enumerate(counts):
        symbols = ''.join(f'{s}{n}' for s, n in c.items() if n)
        n = sum(c.values())
        pos = rng.random((n, 3)) * 8
        atoms = Atoms(symbols, positions=pos, cell=[10] * 3, pbc=True)
        e = sum(e_ref[s] * k for s, k in c.items()) + rng.normal(0, noise)
        frames.append(Frame.from_atoms(_labelled(atoms, energy=e), index=i))
    return frames


def test_reference_energies_recovered():
    e_ref = {'Ga': -3.1, 'In': -2.4, 'N': -8.3}
    rng = np.random.default_rng(0)
    counts = [dict(zip(e_ref, rng.integers(1, 9, size=3))) for _ in range(30)]
    frames = _composition_frames(counts, e_ref, noise=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        refs = fit_reference_energies(frames, ['Ga', 'In', 'N', 'O'])
    for s, e in e_ref.items():
        assert refs[s] == pytest.approx(e, abs=0.01)
    assert refs['O'] == 0.0  # absent from the data
    graphs = build_graphs(frames, 3.0, 'x')
    assert fit_reference_energies(graphs, [31, 49, 7])['In'] == pytest.approx(
        refs['In'], abs=1e-4
    )


def test_reference_energies_rank_deficient_end_members():
    e_ref = {'Ga': -3.1, 'In': -2.4, 'N': -8.3}
    counts = [{'Ga': 4, 'In': 0, 'N': 4}, {'Ga': 0, 'In': 4, 'N': 4}] * 3
    frames = _composition_frames(counts, e_ref)
    with pytest.warns(UserWarning, match='Ga, In, N are not separately determined'):
        refs = fit_reference_energies(frames, ['Ga', 'In', 'N'])
    # the combinations present are still reproduced exactly
    assert 4 * (refs['Ga'] + refs['N']) == pytest.approx(4 * (-3.1 - 8.3))
    assert 4 * (refs['In'] + refs['N']) == pytest.approx(4 * (-2.4 - 8.3))


@needs_data
def test_force_rms_skips_unlabelled_forces():
    pbe = read_frames(DATA / 'ethanol' / 'hf_train_pbe.extxyz', index=':20')
    cc = read_frames(DATA / 'ethanol' / 'hf_train_ccsdt.extxyz', index=':20')
    expected = np.sqrt(np.mean(np.concatenate([f.forces.ravel() for f in pbe]) ** 2))
    graphs = build_graphs(pbe, 5.0, 'pbe') + build_graphs(cc, 5.0, 'ccsdt')
    assert force_rms(graphs) == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(force_rms(graphs))


def test_as_univ_list():
    univ = as_univ_list({'Ga': -3.0, 'N': -8.0})
    assert len(univ) == 119
    assert univ[31] == -3.0 and univ[7] == -8.0 and sum(univ) == -11.0

"""scripts/surrogate_fidelity.py: the stand-in HF task of docs/benchmarks.md
("Round 7") must be a consistent potential-energy difference and a task the
method runner can pair."""

import importlib.util

import ase.io
import numpy as np
import pytest
from conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location(
        'surrogate_fidelity', REPO / 'scripts' / 'surrogate_fidelity.py'
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pair_difference_forces_are_minus_its_energy_gradient(ingan_frames):
    sf = _script()
    rng = np.random.default_rng(0)
    atoms = ingan_frames[0].copy()
    n_col = len(sf.ELEMENTS) + len(sf.PAIR_TYPES) * len(sf.CENTRES)
    coef = rng.normal(size=n_col)
    _, forces = sf.gap(coef, atoms)
    h = 1e-5
    for a, c in ((0, 0), (3, 2), (len(atoms) - 1, 1)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, c] += h
        minus.positions[a, c] -= h
        fd = -(sf.gap(coef, plus)[0] - sf.gap(coef, minus)[0]) / (2 * h)
        assert forces[a, c] == pytest.approx(fd, rel=1e-5, abs=1e-7)
    assert np.abs(forces).max() > 1e-3  # not trivially zero


def test_surrogate_task_is_paired_and_labelled_where_hf_is_missing(
    shared_data, tmp_path
):
    from sevenn_mf.analysis.delta import pair_frames
    from sevenn_mf.data.databases import read_frames

    sf = _script()
    sf.main(['-o', str(tmp_path)])
    hf = ase.io.read(tmp_path / 'hf_train_surrogate.extxyz', ':')
    lf = ase.io.read(tmp_path / 'hf_train_pbe.extxyz', ':')
    score = ase.io.read(tmp_path / 'score_surrogate.extxyz', ':')
    real_hf = ase.io.read(shared_data / 'ingan' / 'hf_train_r2scan.extxyz', ':')
    assert len(hf) == len(lf) == len(real_hf)
    assert {a.info['x_In'] for a in hf} == {0.0, 1.0}
    assert {a.info['x_In'] for a in score} == {0.5}
    assert {a.info['fidelity'] for a in hf + score} == {'r2scan'}
    # the delta method pairs the surrogate cells with their PBE labels
    pairs = pair_frames(
        read_frames(str(tmp_path / 'hf_train_surrogate.extxyz')),
        read_frames(str(tmp_path / 'hf_train_pbe.extxyz')),
    )
    assert len(pairs) == len(hf)
    # the difference is the pair model's, and differs between the two end members
    gaps = [
        (a.get_potential_energy() - b.get_potential_energy()) / len(a)
        for a, b in zip(hf, lf)
    ]
    assert np.ptp(gaps) > 1.0  # eV/atom: GaN and InN references differ
    assert not np.allclose(hf[0].get_forces(), lf[0].get_forces())


def test_gap_fit_slopes_and_errors_equal_a_direct_fit():
    """scripts/gap_fit.py's per-composition numbers (Round 11's diagnostic)."""
    spec = importlib.util.spec_from_file_location(
        'gap_fit', REPO / 'scripts' / 'gap_fit.py'
    )
    gf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gf)
    rng = np.random.default_rng(3)
    vol = rng.uniform(10.0, 12.0, 12)
    group = [0.0] * 6 + [1.0] * 6
    true = np.where(np.array(group) == 0.0, 0.05, 0.02) * vol
    model = 0.5 * true + rng.normal(scale=1e-3, size=12)
    rows = gf.fit_rows(group, vol, true, model)
    assert [r['group'] for r in rows] == [0.0, 1.0] and rows[0]['n'] == 6
    assert rows[0]['true_slope'] == pytest.approx(0.05)
    assert rows[1]['true_slope'] == pytest.approx(0.02)
    for r, m in zip(rows, (slice(0, 6), slice(6, 12))):
        assert r['model_slope'] == pytest.approx(np.polyfit(vol[m], model[m], 1)[0])
        assert r['rmse'] == pytest.approx(
            np.sqrt(np.mean((model[m] - true[m]) ** 2))
        )
        assert r['corr'] == pytest.approx(np.corrcoef(true[m], model[m])[0, 1])

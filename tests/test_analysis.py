"""The paper's experiments as tools (issue 6): methods, Delta-learning,
learning curves, mixing energies, energies above hull. Fast (tiny models,
1-2 epochs on the bundled quickstart data)."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from conftest import QUICKSTART_DATA, REPO

from sevenn_mf.analysis.delta import DeltaPairingError, difference_atoms, pair_frames
from sevenn_mf.analysis.hull import (
    compare,
    end_member_references,
    energies_above_hull,
    formula_units,
    mixing_energies,
)
from sevenn_mf.data.databases import Frame

TINY_MODEL = {
    'chemical_species': 'auto',
    'cutoff': 4.0,
    'channel': 4,
    'lmax': 1,
    'num_convolution_layer': 1,
    'is_parity': False,
    'weight_nn_hidden_neurons': [8],
    'radial_basis': {'radial_basis_name': 'bessel', 'bessel_basis_num': 4},
}


# ---- mixing energy ----------------------------------------------------------------
def test_mixing_energy_known_answer():
    # end members per formula unit: GaN -10 eV, InN -8 eV
    refs = {'GaN': -10.0, 'InN': -8.0}
    comps = [
        {'Ga': 2, 'In': 2, 'N': 4},
        {'Ga': 3, 'In': 1, 'N': 4},
        {'Ga': 4, 'N': 4},
    ]
    energies = [
        2 * -10 + 2 * -8 + 0.8,  # +0.8 eV over 8 atoms / 4 f.u.
        3 * -10 + 1 * -8 - 0.4,  # below the tie line
        4 * -10,
    ]
    per_atom, per_fu, frac = mixing_energies(energies, comps, refs)
    assert per_atom == pytest.approx([0.1, -0.05, 0.0])
    assert per_fu == pytest.approx([0.2, -0.1, 0.0])
    assert frac[1] == pytest.approx([0.75, 0.25])
    assert formula_units(
        {'Ga': 3, 'In': 1, 'N': 4}, ['GaN', 'InN']
    ) == pytest.approx([3, 1])
    with pytest.raises(ValueError, match='not a combination'):
        formula_units({'Ga': 2, 'N': 1}, ['GaN', 'InN'])


def test_end_member_choice_and_statistics():
    comps = [
        {'Ga': 4, 'N': 4},
        {'Ga': 4, 'N': 4},
        {'In': 2, 'N': 2},
        {'Ga': 2, 'In': 2, 'N': 4},
    ]
    ref = np.array([-40.0, -40.4, -16.2, -36.0])  # lowest GaN: #1 (-10.1 / f.u.)
    pred = np.array([-40.2, -40.0, -16.0, -35.0])
    lowest = end_member_references(comps, ref, pred, ['GaN', 'InN'], 'lowest')
    assert lowest['GaN'] == {
        'ref': pytest.approx(-10.1),
        'pred': pytest.approx(-10.0),
        'indices': [1],
    }  # same structure on both sides
    assert lowest['InN']['ref'] == pytest.approx(-8.1)
    mean = end_member_references(comps, ref, pred, ['GaN', 'InN'], 'mean')
    assert mean['GaN']['ref'] == pytest.approx(-10.05)
    assert mean['GaN']['pred'] == pytest.approx(-10.025)
    s = compare([1.0, 2.0, 4.0], [1.0, 3.0, 3.0])
    # residuals 0, -1, 1; reference mean 7/3 -> SS_tot = 16/9 + 4/9 + 4/9
    assert s['mae'] == pytest.approx(2 / 3)
    assert s['r2'] == pytest.approx(1 - 2 / (24 / 9))


# ---- energy above hull (pymatgen) -------------------------------------------------
def test_hull_elemental_known_answer():
    pytest.importorskip('pymatgen')
    # Ga and N at 0 eV/atom, GaN at -1 eV/atom; Ga3N at -0.25 eV/atom lies
    # 0.25 eV/atom above the Ga-GaN tie line (-0.5 eV/atom at x_N = 0.25)
    comps = [{'Ga': 1}, {'N': 2}, {'Ga': 1, 'N': 1}, {'Ga': 3, 'N': 1}]
    energies = [0.0, 0.0, -2.0, -1.0]
    eh = energies_above_hull(comps, energies)
    assert eh == pytest.approx([0.0, 0.0, 0.0, 0.25], abs=1e-9)
    with pytest.raises(ValueError, match='terminals'):
        energies_above_hull(comps[2:], energies[2:])  # no elemental entries


def test_hull_compound_known_answer():
    pytest.importorskip('pymatgen')
    comps = [
        {'Ga': 1, 'N': 1},
        {'In': 1, 'N': 1},
        {'Ga': 2, 'In': 2, 'N': 4},
        {'Ga': 3, 'In': 1, 'N': 4},
        {'Ga': 1, 'In': 3, 'N': 4},
    ]
    # GaN -10 / f.u., InN -8 / f.u.; alloys +0.8, +0.4, -0.8 eV from the
    # GaN-InN tie line. The last one (x = 0.75) is below it, so the hull is
    # GaN -- Ga1In3N4 -- InN and the other two are measured from its first leg
    energies = [-10.0, -8.0, -36.0 + 0.8, -38.0 + 0.4, -34.0 - 0.8]
    eh = energies_above_hull(comps, energies, terminals=['GaN', 'InN'])
    # tie line GaN (x=0, -5 eV/atom) -- Ga1In3N4 (x=0.75, -4.35 eV/atom)
    line = lambda x: -5.0 + (x / 0.75) * (-4.35 + 5.0)  # noqa: E731
    assert eh[0] == pytest.approx(0.0, abs=1e-9)
    assert eh[4] == pytest.approx(0.0, abs=1e-9)
    assert eh[2] == pytest.approx(-35.2 / 8 - line(0.5), abs=1e-9)
    assert eh[3] == pytest.approx(-37.6 / 8 - line(0.25), abs=1e-9)
    assert eh[1] == pytest.approx(0.0, abs=1e-9)  # a terminal


# ---- Delta pairing ----------------------------------------------------------------
def _frame(atoms, energy, forces=None, where='x', **info):
    a = atoms.copy()
    a.info.clear()
    a.info.update(info)
    res = {'energy': energy}
    if forces is not None:
        res['forces'] = forces
    a.calc = SinglePointCalculator(a, **res)
    fr = Frame.from_atoms(a, file=where)
    fr.atoms.info.update(info)
    return fr


@pytest.fixture(scope='module')
def cell():
    a = read(QUICKSTART_DATA / 'r2scan.extxyz', 0)
    a.calc = None
    return a


def test_delta_pairing_and_differences(cell):
    f = np.ones((len(cell), 3))
    hf = [
        _frame(cell, -10.0, 2 * f, set='s', index=0),
        _frame(cell, -11.0, None, set='s', index=1),
    ]  # energy only
    lf = [
        _frame(cell, -4.0, f, set='s', index=1),
        _frame(cell, -3.0, f, set='s', index=0),
        _frame(cell, -5.0, f, set='s', index=7),
    ]  # extra LF structures are fine
    pairs = pair_frames(hf, lf)
    assert [(p[0].atoms.info['index'], p[1].energy) for p in pairs] == [
        (0, -3.0),
        (1, -4.0),
    ]
    diff = difference_atoms(pairs)
    assert diff[0].get_potential_energy() == pytest.approx(-7.0)
    assert diff[0].get_forces() == pytest.approx(f)
    assert diff[1].get_potential_energy() == pytest.approx(-7.0)
    assert 'forces' not in diff[1].calc.results  # only where both have forces


def test_delta_pairing_errors(cell):
    hf = [
        _frame(cell, -10.0, set='s', index=0, where='hf.extxyz'),
        _frame(cell, -10.0, set='s', index=3, where='hf.extxyz'),
    ]
    lf = [_frame(cell, -3.0, set='s', index=0)]
    with pytest.raises(
        DeltaPairingError,
        match=r'1 HF structure\(s\) have no LF label'
        r'.*hf.extxyz.*index=3',
    ):
        pair_frames(hf, lf)
    with pytest.raises(DeltaPairingError, match='no set / index'):
        pair_frames([_frame(cell, -1.0)], lf)
    with pytest.raises(DeltaPairingError, match='appears twice'):
        pair_frames(hf[:1], lf + [_frame(cell, -3.0, set='s', index=0)])
    moved = cell.copy()
    moved.positions[0] += 0.1
    with pytest.raises(DeltaPairingError, match='not the same structure'):
        pair_frames(hf[:1], [_frame(moved, -3.0, set='s', index=0)])
    other = [_frame(cell, -3.0, set='other', index=0)]  # same index, other set
    with pytest.raises(DeltaPairingError, match='no LF label'):
        pair_frames(hf[:1], other)


# ---- training through the methods -------------------------------------------------
def _train_section(epochs):
    return {
        'random_seed': 1,
        'epoch': epochs,
        'per_epoch': 100,
        'optimizer': 'adam',
        'optim_param': {'lr': 0.01},
        'scheduler': 'linearlr',
        'scheduler_param': {
            'start_factor': 1.0,
            'end_factor': 0.5,
            'total_iters': epochs,
        },
        'loss': 'mse',
        'force_loss_weight': 0.1,
        'stress_loss_weight': 1e-4,
        'best_fidelity': 'r2scan',
        'device': 'cpu',
    }


def _methods_yaml(tmp_path, epochs=1, **train_extra):
    """PBE + r2SCAN (quickstart slices) and paired 'LF' labels of the r2SCAN
    structures (synthetic: the r2SCAN labels shifted, for the mechanics)."""
    pbe = read(QUICKSTART_DATA / 'pbe.extxyz', ':')[:12]
    r2 = read(QUICKSTART_DATA / 'r2scan.extxyz', ':')[:8]
    write(tmp_path / 'pbe.extxyz', pbe)
    write(tmp_path / 'r2scan.extxyz', r2)
    paired = []
    for a in r2:
        b = a.copy()
        b.info = {'set': a.info['set'], 'index': a.info['index'], 'fidelity': 'pbe'}
        b.calc = SinglePointCalculator(
            b,
            energy=a.get_potential_energy() + 0.5 * len(a),
            forces=0.9 * a.get_forces(),
        )
        paired.append(b)
    write(tmp_path / 'r2scan_at_pbe.extxyz', paired)
    raw = {
        'model': dict(TINY_MODEL),
        'train': dict(
            _train_section(epochs),
            hf_fidelity='r2scan',
            delta={'paired_files': 'r2scan_at_pbe.extxyz'},
            **train_extra,
        ),
        'data': {
            'batch_size': 4,
            'databases': [
                {
                    'name': 'lf',
                    'fidelity': 'pbe',
                    'files': 'pbe.extxyz',
                    'validation': {'ratio': 0.25, 'seed': 1},
                },
                {
                    'name': 'hf',
                    'fidelity': 'r2scan',
                    'files': 'r2scan.extxyz',
                    'validation': {'ratio': 0.25, 'seed': 1},
                },
            ],
        },
    }
    path = tmp_path / 'methods.yaml'
    path.write_text(yaml.safe_dump(raw))
    return path


def test_delta_method_sum_calculator_and_one_deployed_file(tmp_path, cell):
    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.analysis.delta import (
        DeltaCalculator,
        deploy_sum,
        evaluate_deployed,
    )
    from sevenn_mf.cli import main

    path = _methods_yaml(tmp_path)
    wd = tmp_path / 'delta'
    assert main(['train', str(path), '--method', 'delta', '-w', str(wd), '-q']) == 0
    meta = json.loads((wd / 'model.json').read_text())
    assert [p['fidelity'] for p in meta['parts']] == ['pbe', 'delta']
    # model B learned the differences of the paired structures
    diff = read(wd / 'delta_data' / 'hf.extxyz', ':')
    r2 = read(tmp_path / 'r2scan.extxyz', ':')
    assert diff[0].get_potential_energy() == pytest.approx(-0.5 * len(r2[0]))
    assert diff[0].get_forces() == pytest.approx(0.1 * r2[0].get_forces(), abs=1e-6)

    atoms = cell.repeat((1, 1, 2))
    a = atoms.copy()
    a.calc = DeltaCalculator.from_run(str(wd))
    e, f = a.get_potential_energy(), a.get_forces()
    parts = [(wd / p['checkpoint'], p['fidelity']) for p in meta['parts']]
    e_sum = 0.0
    for ckpt, fid in parts:
        b = atoms.copy()
        b.calc = SevenNetMFCalculator(str(ckpt), fid)
        e_sum += b.get_potential_energy()
    assert e == pytest.approx(e_sum, abs=1e-5)
    # one TorchScript file for pair_style e3gnn computing the same sum
    pt = deploy_sum([(str(c), fid) for c, fid in parts], str(tmp_path / 'delta.pt'))
    e_pt, f_pt = evaluate_deployed(pt, atoms)
    assert e_pt == pytest.approx(e, abs=1e-4)
    assert np.abs(f_pt - f).max() < 1e-4


def test_delta_with_a_fitted_scale(tmp_path, cell):
    """``train.delta.scale: fitted``: paired LF energies that are the HF ones
    over 1.25 (plus references) give a = 1.25 on the training pairs alone;
    model B then learns HF - 1.25 LF, model A is replaced by a copy with
    1.25 times its energy and forces, which sevenn's own loader reads back,
    the sum deploys as one file, and the learning curve's LF-model error
    still reads the unscaled LF model."""
    import sevenn.util as sevenn_util
    from helpers import calc_results

    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.analysis.delta import (
        DeltaCalculator,
        deploy_sum,
        evaluate_deployed,
        fit_delta_scale,
    )
    from sevenn_mf.analysis.learning_curve import lf_parts
    from sevenn_mf.analysis.methods import MethodError, read_method_input, run_method
    from sevenn_mf.data.graphs import split_validation

    path = _methods_yaml(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw['train']['delta']['scale'] = 'fitted'
    path.write_text(yaml.safe_dump(raw))
    r2 = read(tmp_path / 'r2scan.extxyz', ':')
    paired = read(tmp_path / 'r2scan_at_pbe.extxyz', ':')
    ref = {7: -0.3, 31: 0.2, 49: 0.45}  # per element: not only a shift per atom
    # the hf database's validation split (ratio 0.25, seed 1): those pairs get
    # an LF energy that is off, which the fit must not see
    held_idx = split_validation(list(range(len(r2))), 0.25, 1)[1]
    for i, (a, b) in enumerate(zip(r2, paired)):
        e0 = sum(ref[z] for z in a.numbers)
        b.calc = SinglePointCalculator(
            b,
            energy=(a.get_potential_energy() - e0) / 1.25 + 5.0 * (i in held_idx),
            forces=a.get_forces() / 1.25,
        )
    write(tmp_path / 'r2scan_at_pbe.extxyz', paired)
    # a first HF structure with forces only: model B's database still holds
    # it, so the fit must split the same list (by energy pairs alone the
    # split would hold out other structures and fit a corrupted one)
    assert 0 in held_idx
    r2[0].calc = SinglePointCalculator(r2[0], forces=r2[0].get_forces())
    write(tmp_path / 'r2scan.extxyz', r2)
    mi = read_method_input(str(path))

    fit = fit_delta_scale(mi, 'pbe')
    assert fit.structures == len(r2) - len(held_idx)
    assert fit.a == pytest.approx(1.25, rel=1e-9)
    assert fit.se < 1e-6
    assert fit.reach > 0  # the PBE pool's energies spread beyond the pairs'

    logs = []
    wd = tmp_path / 'delta'
    res = run_method(mi, 'delta', str(wd), screen=False, log=logs.append)
    assert any('energy scale fit' in ln and 'x1.2500' in ln for ln in logs)
    base, lf_stage = res.parts[0][0], res.stages[0].checkpoint
    assert base != lf_stage
    diff = read(wd / 'delta_data' / 'hf.extxyz', ':')
    assert len(diff) == len(r2)
    for i in range(len(r2)):
        if i not in held_idx:
            e0 = sum(ref[z] for z in r2[i].numbers)
            assert diff[i].get_potential_energy() == pytest.approx(e0, abs=1e-6)
            assert np.abs(diff[i].get_forces()).max() < 1e-6

    atoms = cell.repeat((1, 1, 2))
    e_a, f_a = [], []
    for ckpt in (lf_stage, base):
        b = atoms.copy()
        b.calc = SevenNetMFCalculator(ckpt, 'pbe')
        e_a.append(b.get_potential_energy())
        f_a.append(b.get_forces())
    assert e_a[1] == pytest.approx(1.25 * e_a[0], rel=1e-5)
    np.testing.assert_allclose(f_a[1], 1.25 * f_a[0], atol=1e-5)
    sv = sevenn_util.load_checkpoint(base).build_model()
    e_sv, f_sv, _ = calc_results(sv, atoms, 'pbe')
    assert e_sv == pytest.approx(e_a[1], abs=1e-4)
    np.testing.assert_allclose(f_sv, f_a[1], atol=1e-4)

    b = atoms.copy()
    b.calc = DeltaCalculator.from_run(str(wd))
    e = b.get_potential_energy()
    pt = deploy_sum(res.parts, str(tmp_path / 'delta.pt'))
    e_pt, _ = evaluate_deployed(pt, atoms)
    assert e_pt == pytest.approx(e, abs=1e-4)
    assert lf_parts(str(wd), 'pbe') == [(lf_stage, 'pbe')]

    raw = yaml.safe_load(path.read_text())
    raw['train']['delta']['scale'] = 'learned'
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        MethodError, match='train.delta.scale must be fixed or fitted'
    ):
        read_method_input(str(bad))


def test_fit_energy_scale_slope_and_refusals():
    """The one least-squares routine behind both fitted scales: the slope
    beyond composition (two compositions, each with its own references), its
    standard error, and a clear refusal where there is no slope to fit or it
    is not positive."""
    from sevenn_mf.data.references import fit_energy_scale, scale_reach

    rng = np.random.default_rng(0)
    numbers = [np.array([7, 31] * 2), np.array([7, 49, 7, 31])] * 10
    ref = {7: -1.0, 31: -3.0, 49: -2.0}
    x = rng.normal(size=len(numbers)) * 4
    e0 = np.array([sum(ref[z] for z in zz) for zz in numbers])
    a, se = fit_energy_scale(numbers, 1.3 * x + e0, x)
    assert a == pytest.approx(1.3, rel=1e-10) and se < 1e-8
    noisy = 1.3 * x + e0 + rng.normal(size=len(x)) * 0.05
    a, se = fit_energy_scale(numbers, noisy, x)
    assert abs(a - 1.3) < 4 * se and 0 < se < 0.05
    flat = np.array([len(zz) * (1.0 if 49 in zz else 2.0) for zz in numbers])
    with pytest.raises(ValueError, match='no scale can be fitted'):
        fit_energy_scale(
            numbers, 1.3 * x, flat
        )  # per atom: one value per composition
    with pytest.raises(ValueError, match='not a positive number'):
        fit_energy_scale(numbers, -x + e0, x)

    # how far a pool reaches beyond the fitted structures: with distortions
    # symmetric within each composition the pool's references are exact, so
    # the reach is the percentile of |distortion - the fitted ones' mean|
    d = np.linspace(-0.2, 0.2, 41)
    pool = [np.array([7, 31] * 2), np.array([7, 49, 7, 31])]
    pool_numbers = [z for z in pool for _ in d]
    pool_x = [len(z) * e for z in pool for e in d] + np.array(
        [sum(ref[e] for e in z) for z in pool_numbers]
    )
    fit_e = np.array([0.01, 0.03])
    fit_x = [4 * e + sum(ref[k] for k in z) for z, e in zip(pool, fit_e)]
    want = np.percentile(np.abs(np.concatenate([d, d]) - fit_e.mean()), 95)
    got = scale_reach(pool, fit_x, pool_numbers, pool_x)
    assert got == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize(
    'low,high,scale', [(1.2, 1.8, 'linear'), (6.0, 90.0, 'log'), (8.0, 230.0, 'log')]
)
def test_learning_curve_error_axis_has_labelled_ticks(low, high, scale):
    """A narrow range of errors goes on a linear axis (a log axis over 1.2-1.8
    has no labelled tick); a wide one stays logarithmic; both show numbers."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from sevenn_mf.analysis.learning_curve import readable_error_axis

    fig, ax = plt.subplots()
    ax.plot([30, 100], [high, low])
    readable_error_axis(ax)
    fig.canvas.draw()
    labels = [
        t.get_text()
        for t in ax.yaxis.get_ticklabels(which='both')
        if t.get_text() and low <= t.get_position()[1] <= high
    ]
    plt.close(fig)
    assert ax.get_yscale() == scale
    assert len(labels) >= 2, labels


def test_learning_curve_resumable(tmp_path):
    from sevenn_mf.analysis.learning_curve import RESULTS, run_learning_curve

    _methods_yaml(tmp_path, epochs=1)
    write(
        tmp_path / 'test.extxyz',
        read(QUICKSTART_DATA / 'r2scan_test_x0.5.extxyz', ':4'),
    )
    spec = {
        'input': 'methods.yaml',
        'methods': ['mf-onehot'],
        'hf_sizes': [4],
        'seeds': [2],
        'test': {'files': ['test.extxyz']},
        'mixing': {'end_members': ['r2scan.extxyz']},
    }
    spec_path = tmp_path / 'lc.yaml'
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / 'lc'
    logs = []
    rows = run_learning_curve(str(spec_path), str(out), log=logs.append)
    assert len(rows) == 1
    r = rows[0]
    assert (r['method'], r['n_hf'], r['seed']) == ('mf-onehot', '4', '2')
    assert np.isfinite(float(r['energy_mae'])) and np.isfinite(float(r['force_mae']))
    assert np.isfinite(float(r['mixing_mae']))
    for name in ('summary.csv', 'learning_curve.png', RESULTS):
        assert (out / name).is_file()
    subset = read(out / 'subsets' / 's2_n4' / 'hf.extxyz', ':')
    assert len(subset) == 4
    ckpt = out / r['run_dir'] / 'mf-onehot' / 'checkpoint_best.pth'
    mtime = ckpt.stat().st_mtime

    # second invocation: the finished run is skipped
    logs.clear()
    rows2 = run_learning_curve(str(spec_path), str(out), log=logs.append)
    assert rows2 == rows
    assert any('skipped' in ln for ln in logs)
    assert ckpt.stat().st_mtime == mtime

    # results lost, training kept: re-evaluated without training again
    os.unlink(out / RESULTS)
    logs.clear()
    rows3 = run_learning_curve(str(spec_path), str(out), log=logs.append)
    assert any('reused' in ln for ln in logs) and ckpt.stat().st_mtime == mtime
    assert rows3[0]['energy_mae'] == r['energy_mae']
    with open(out / RESULTS) as fh:
        assert len(list(csv.DictReader(fh))) == 1


def test_learning_curve_merge_per_seed_folders(tmp_path):
    """Seeds run side by side in their own folders merge into one curve: every
    row kept once, run_dir still pointing at the run, mean and sample sd over
    the seeds as computed directly; a run in two folders is refused."""
    from sevenn_mf.analysis.learning_curve import (
        COLUMNS,
        RESULTS,
        SpecError,
        _write_csv,
        merge_results,
    )
    from sevenn_mf.cli import main

    energies = {1: 9.5, 2: 13.25, 3: 11.0}
    for seed, e in energies.items():
        folder = tmp_path / f's{seed}'
        (folder / 'runs' / 'mf' / f'n80_s{seed}').mkdir(parents=True)
        rows = [
            {'method': 'mf', 'n_hf': 80, 'seed': seed, 'energy_mae': e,
             'force_mae': 100 + seed, 'run_dir': f'runs/mf/n80_s{seed}'},
            {'method': 'delta', 'n_hf': 40, 'seed': seed, 'energy_mae': 2 * e,
             'run_dir': f'runs/delta/n40_s{seed}'},
        ]  # fmt: skip
        _write_csv(str(folder / RESULTS), COLUMNS, rows)
    out = tmp_path / 'all'
    merged = merge_results(str(out), [str(tmp_path / f's{s}') for s in energies])
    assert len(merged) == 6
    for r in merged:
        if r['method'] == 'mf':
            assert (out / r['run_dir']).resolve() == (
                tmp_path / f's{r["seed"]}' / 'runs' / 'mf' / f'n80_s{r["seed"]}'
            ).resolve()
    with open(out / 'summary.csv') as fh:
        summ = {(r['method'], r['n_hf']): r for r in csv.DictReader(fh)}
    e = np.array(list(energies.values()))
    assert float(summ[('mf', '80')]['energy_mae_mean']) == pytest.approx(e.mean())
    assert float(summ[('mf', '80')]['energy_mae_std']) == pytest.approx(
        e.std(ddof=1)
    )
    assert float(summ[('delta', '40')]['energy_mae_std']) == pytest.approx(
        2 * e.std(ddof=1)
    )
    assert (out / 'learning_curve.png').is_file()

    with pytest.raises(SpecError, match='seed=1 is in both'):
        merge_results(str(tmp_path / 'dup'), [str(tmp_path / 's1')] * 2)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SpecError, match='no results'):
        merge_results(str(tmp_path / 'e'), [str(tmp_path / 'empty')])
    # the command line: a merge needs no spec; nothing to run needs one
    assert main(['learning-curve', '--merge', str(tmp_path / 's2'),
                 '-w', str(tmp_path / 'cli')]) == 0  # fmt: skip
    with open(tmp_path / 'cli' / RESULTS) as fh:
        assert len(list(csv.DictReader(fh))) == 2
    assert main(['learning-curve', '-w', str(tmp_path / 'cli2')]) == 2


def test_method_input_errors(tmp_path):
    from sevenn_mf.analysis.methods import MethodError, read_method_input, run_method

    path = _methods_yaml(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw['train']['method'] = 'magic'
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MethodError, match='unknown method'):
        read_method_input(str(bad))
    raw['train']['method'] = 'delta'
    raw['train'].pop('delta')
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MethodError, match='paired_files'):
        run_method(read_method_input(str(bad)), None, str(tmp_path / 'w'))
    raw['train']['hf_fidelity'] = 'ccsdt'
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MethodError, match="no database has the HF fidelity 'ccsdt'"):
        run_method(read_method_input(str(bad)), 'hf-only', str(tmp_path / 'w'))

    # an HF structure without its LF partner stops delta, mf.paired and the
    # restarts' criterion before anything trains (the LF stage takes minutes)
    partners = read(tmp_path / 'r2scan_at_pbe.extxyz', ':')
    write(tmp_path / 'r2scan_at_pbe.extxyz', partners[:3] + partners[4:])
    missing = (
        rf'1 HF structure\(s\) have no LF label.*index={partners[3].info["index"]}'
    )
    for method, mf in [
        ('delta', None),
        ('mf', {'paired': True}),
        ('mf', {'restarts': 2}),
    ]:
        raw = yaml.safe_load(path.read_text())
        if mf:
            raw['train']['mf'] = mf
        bad.write_text(yaml.safe_dump(raw))
        wd = tmp_path / f'w_{method}'
        with pytest.raises(DeltaPairingError, match=missing):
            run_method(read_method_input(str(bad)), method, str(wd))
        assert not wd.exists()


def test_mf_paired_trains_the_hf_structures_at_lf_too(tmp_path):
    """train.mf.paired: the MF stage gets an LF database of the HF
    structures' paired LF labels (the HF subset's only, in HF order, split for
    validation as the HF database is); without paired files it is refused."""
    from sevenn_mf.analysis.methods import MethodError, read_method_input, run_method

    path = _methods_yaml(tmp_path, mf={'paired': True})
    r2 = read(tmp_path / 'r2scan.extxyz', ':')
    subset = tmp_path / 'hf_subset.extxyz'
    write(subset, [r2[5], r2[2], r2[7], r2[0]])
    mi = read_method_input(str(path)).with_hf_files({'hf': [str(subset)]})
    wd = tmp_path / 'mf'
    run_method(mi, 'mf', str(wd), screen=False)
    stage = yaml.safe_load((wd / 'mf' / 'input.yaml').read_text())
    dbs = {db['name']: db for db in stage['data']['databases']}
    assert set(dbs) == {'lf', 'hf', 'hf_pbe'}
    entry = dbs['hf_pbe']
    assert entry['fidelity'] == 'pbe'
    assert entry['validation'] == {'ratio': 0.25, 'seed': 1}
    assert 'weight' not in entry  # an LF database, weighted as LF data
    lf = read(entry['files'][0], ':')
    assert [a.info['index'] for a in lf] == [
        r2[i].info['index'] for i in (5, 2, 7, 0)
    ]
    for a, i in zip(lf, (5, 2, 7, 0)):
        assert np.allclose(a.positions, r2[i].positions)
        # the paired file's own labels: r2SCAN + 0.5 eV/atom, 0.9 x forces
        e = r2[i].get_potential_energy() + 0.5 * len(a)
        assert a.get_potential_energy() == pytest.approx(e, abs=1e-6)
        assert a.get_forces() == pytest.approx(0.9 * r2[i].get_forces(), abs=1e-6)

    raw = yaml.safe_load(path.read_text())
    raw['train'].pop('delta')
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MethodError, match='train.mf.paired needs train.delta'):
        run_method(read_method_input(str(bad)), 'mf', str(tmp_path / 'w'))
    raw['train']['mf'] = {'paired': 'yes'}
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MethodError, match='train.mf.paired must be true or false'):
        read_method_input(str(bad))


def test_mf_restarts_keep_the_best_gap_fit(tmp_path):
    """train.mf.restarts: k runs of the MF stage with seeds seed + 1000 r;
    the kept one has the lowest RMSE of the heads' gap against the paired
    labels' gap (equal to a direct computation), and model.json names it."""
    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.analysis.methods import MethodError, read_method_input, run_method

    path = _methods_yaml(tmp_path, mf={'restarts': 2}, random_seed=3)
    wd = tmp_path / 'mf'
    run_method(read_method_input(str(path)), 'mf', str(wd), screen=False)
    seeds = [
        yaml.safe_load((wd / d / 'input.yaml').read_text())['train']['random_seed']
        for d in ('mf', 'mf_r1')
    ]
    assert seeds == [3, 1003]
    info = json.loads((wd / 'restarts.json').read_text())
    values = [r['value'] for r in info['restarts']]
    assert [r['name'] for r in info['restarts']] == ['gap_rmse'] * 2
    assert info['kept'] == int(np.argmin(values))
    kept = info['restarts'][info['kept']]['stage']
    meta = json.loads((wd / 'model.json').read_text())
    assert meta['parts'][0]['checkpoint'] == f'{kept}/checkpoint_best.pth'
    # the criterion of restart 1, directly: r2SCAN head - PBE head against the
    # paired labels (r2SCAN - (r2SCAN + 0.5 eV/atom) = -0.5 eV/atom)
    ckpt = str(wd / 'mf_r1' / 'checkpoint_best.pth')
    heads = {f: SevenNetMFCalculator(ckpt, f) for f in ('r2scan', 'pbe')}
    err = []
    for a in read(tmp_path / 'r2scan.extxyz', ':'):
        e = {}
        for f, c in heads.items():
            b = a.copy()
            b.calc = c
            e[f] = b.get_potential_energy() / len(b)
        err.append(e['r2scan'] - e['pbe'] + 0.5)
    assert values[1] == pytest.approx(np.sqrt(np.mean(np.square(err))), rel=1e-4)

    # without paired LF labels: the HF head's energy RMSE on the HF structures
    raw = yaml.safe_load(path.read_text())
    raw['train'].pop('delta')
    plain = tmp_path / 'plain.yaml'
    plain.write_text(yaml.safe_dump(raw))
    wd2 = tmp_path / 'mf_plain'
    run_method(read_method_input(str(plain)), 'mf', str(wd2), screen=False)
    info2 = json.loads((wd2 / 'restarts.json').read_text())
    assert [r['name'] for r in info2['restarts']] == ['hf_energy_rmse'] * 2

    raw['train']['mf'] = {'restarts': 0}
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MethodError, match='train.mf.restarts must be a positive'):
        read_method_input(str(bad))


def test_deployed_delta_sum_in_lammps(tmp_path, cell):
    """The one-file delta model in pair_style e3gnn equals DeltaCalculator."""
    from lammps_utils import find_lmp, run_lammps, thermo_table

    from sevenn_mf.analysis.delta import DeltaCalculator, deploy_sum
    from sevenn_mf.analysis.methods import read_method_input, run_method

    lmp = find_lmp('serial')
    if lmp is None:
        pytest.skip('no LAMMPS with pair_style e3gnn (scripts/build_lammps.sh)')
    path = _methods_yaml(tmp_path)
    res = run_method(
        read_method_input(str(path)),
        'delta',
        str(tmp_path / 'd'),
        screen=False,
        log=lambda s: None,
    )
    pt = deploy_sum(res.parts, str(tmp_path / 'sum.pt'))
    species = ['Ga', 'In', 'N']
    atoms = cell.repeat((2, 1, 1))
    data = tmp_path / 'data.lmp'
    write(data, atoms, format='lammps-data', specorder=species, masses=True)
    back = read(data, format='lammps-data', Z_of_type={1: 31, 2: 49, 3: 7})
    back.pbc = True
    out = run_lammps(
        lmp,
        f"""
units metal
atom_style atomic
boundary p p p
read_data {data}
pair_style e3gnn
pair_coeff * * {pt} {' '.join(species)}
thermo_style custom step pe
thermo_modify format float %20.10f
run 0
""",
        tmp_path,
    )
    back.calc = DeltaCalculator(
        res.parts[0][0], res.parts[0][1], res.parts[1][0], res.parts[1][1]
    )
    assert thermo_table(out)[-1]['PotEng'] == pytest.approx(
        back.get_potential_energy(), abs=1e-4 * len(back)
    )


def test_mf_started_from_the_shared_lf_model(tmp_path, cell):
    """``train.mf: {init: lf}``: the MF stage starts from the LF stage that
    transfer and delta use (trained once, in the shared folder), as a
    pretrained model whose HF fidelity is added as a copy of the LF one."""
    import torch

    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.analysis.methods import MethodError, read_method_input, run_method

    path = _methods_yaml(tmp_path, mf={'init': 'lf'})
    mi = read_method_input(str(path))
    shared = tmp_path / 'shared'
    lf_logs, mf_logs = [], []
    tr = run_method(
        mi, 'transfer', str(tmp_path / 'tr'), screen=False,
        shared_dir=str(shared), log=lf_logs.append,
    )  # fmt: skip
    res = run_method(
        mi, 'mf', str(tmp_path / 'mf'), screen=False,
        shared_dir=str(shared), log=mf_logs.append,
    )  # fmt: skip
    assert [s.name for s in res.stages] == ['lf', 'mf']
    assert not res.stages[0].trained_now  # reused transfer's LF model
    assert res.stages[0].checkpoint == tr.stages[0].checkpoint
    assert any('reused' in ln for ln in mf_logs)
    assert [p[1] for p in res.parts] == ['r2scan']

    # the MF stage's starting point: the LF model's weights in every head
    cfg = yaml.safe_load((tmp_path / 'mf' / 'mf' / 'input.yaml').read_text())
    assert cfg['train']['pretrained'] == tr.stages[0].checkpoint
    assert cfg['train']['pretrained_add'] == {'r2scan': 'pbe'}
    lf_sd = torch.load(tr.stages[0].checkpoint, weights_only=False)[
        'model_state_dict'
    ]
    mf_sd = torch.load(res.parts[0][0], weights_only=False)['model_state_dict']
    assert set(lf_sd) & set(mf_sd)  # shared (convolution) parameters carried over
    a = cell.repeat((1, 1, 2))
    a.calc = SevenNetMFCalculator(res.parts[0][0], 'r2scan')
    assert np.isfinite(a.get_potential_energy())

    # mf-transfer: the same MF stage, then fine-tuned on the HF data alone
    hyb = run_method(
        mi, 'mf-transfer', str(tmp_path / 'mft'), screen=False,
        shared_dir=str(shared), log=mf_logs.append,
    )  # fmt: skip
    assert [s.name for s in hyb.stages] == ['lf', 'mf', 'finetune']
    ft = yaml.safe_load((tmp_path / 'mft' / 'finetune' / 'input.yaml').read_text())
    assert ft['train']['pretrained'] == hyb.stages[1].checkpoint
    assert [db['fidelity'] for db in ft['data']['databases']] == ['r2scan']
    assert hyb.parts == [(hyb.stages[2].checkpoint, 'r2scan')]

    raw = yaml.safe_load(path.read_text())
    raw['train']['mf'] = {'init': 'pbe'}
    bad = tmp_path / 'bad.yaml'
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MethodError, match='train.mf.init must be one of'):
        read_method_input(str(bad))


def test_indexed_recipe_from_lf_and_uncoupled_keeps_sevenns_layers(tmp_path, cell):
    """The InGaN recipe (``fidelity_layer_mode: indexed``, ``mf: {init: lf}``):
    the MF stage converts the shared LF model to per-fidelity weight
    matrices; ``mf-uncoupled`` stays sevenn's one-hot layers whatever the
    template says."""
    import torch

    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.analysis.methods import read_method_input, run_method

    path = _methods_yaml(tmp_path, mf={'init': 'lf'})
    raw = yaml.safe_load(path.read_text())
    raw['model']['fidelity_layer_mode'] = 'indexed'
    path.write_text(yaml.safe_dump(raw))
    mi = read_method_input(str(path))
    shared = str(tmp_path / 'shared')
    res = run_method(mi, 'mf', str(tmp_path / 'mf'), screen=False, shared_dir=shared)
    unc = run_method(
        mi, 'mf-uncoupled', str(tmp_path / 'unc'), screen=False, shared_dir=shared
    )
    mode = {
        name: torch.load(r.parts[0][0], weights_only=False)['config'][
            'fidelity_layer_mode'
        ]
        for name, r in (('mf', res), ('mf-uncoupled', unc))
    }
    assert mode == {'mf': 'indexed', 'mf-uncoupled': 'onehot'}
    assert unc.stages[0].checkpoint == res.stages[0].checkpoint  # one LF model
    sd = torch.load(res.parts[0][0], weights_only=False)['model_state_dict']
    assert any(k.endswith('delta_weight') for k in sd)
    a = cell.repeat((1, 1, 2))
    for fid in ('pbe', 'r2scan'):
        a.calc = SevenNetMFCalculator(res.parts[0][0], fid)
        assert np.isfinite(a.get_potential_energy())


def _stage_config(res, key):
    """{stage name: its checkpoint's config[key]} of a method result."""
    import torch

    return {
        s.name: torch.load(s.checkpoint, weights_only=False)['config'][key]
        for s in res.stages
    }


def test_mf_stage_started_from_lf_takes_its_own_learning_rate(tmp_path):
    """``train.mf.lr`` sets the learning rate of the multi-fidelity stage
    only (a fine-tune of the LF model); the shared LF stage keeps the
    template's; a value that is not a positive number is refused up front."""

    from sevenn_mf.analysis.methods import (
        MethodError,
        read_method_input,
        run_method,
    )

    path = _methods_yaml(tmp_path, mf={'init': 'lf', 'lr': 0.0007})
    mi = read_method_input(str(path))
    res = run_method(
        mi, 'mf', str(tmp_path / 'mf'), screen=False, shared_dir=str(tmp_path / 's')
    )
    lr = {k: v['lr'] for k, v in _stage_config(res, 'optim_param').items()}
    assert lr['mf'] == pytest.approx(0.0007)
    assert lr['lf'] == pytest.approx(mi.raw['train']['optim_param']['lr'])
    assert lr['lf'] != pytest.approx(0.0007)
    for bad in (-1, 0, 'fast', True):
        path = _methods_yaml(tmp_path, mf={'init': 'lf', 'lr': bad})
        with pytest.raises(MethodError, match='train.mf.lr'):
            read_method_input(str(path))


def test_mf_stage_takes_its_own_early_stopping(tmp_path):
    """``train.mf.early_stopping`` replaces ``train.early_stopping`` in the
    multi-fidelity stage only; bad values are refused up front, naming the
    key."""

    from sevenn_mf.analysis.methods import (
        MethodError,
        read_method_input,
        run_method,
    )

    own = {'patience': 3, 'min_delta': 0.01, 'monitor': 'best'}
    path = _methods_yaml(
        tmp_path,
        mf={'init': 'lf', 'early_stopping': own},
        early_stopping={'patience': 5},
    )
    mi = read_method_input(str(path))
    res = run_method(
        mi, 'mf', str(tmp_path / 'mf'), screen=False, shared_dir=str(tmp_path / 's')
    )
    es = _stage_config(res, 'early_stopping')
    assert es['mf'] == own
    assert es['lf'] == {'patience': 5}
    for bad, word in (({'patience': 0}, 'patience'), ({'monitor': 'x'}, 'monitor')):
        path = _methods_yaml(tmp_path, mf={'init': 'lf', 'early_stopping': bad})
        with pytest.raises(MethodError, match=f'train.mf.early_stopping.{word}'):
            read_method_input(str(path))


@pytest.mark.filterwarnings('ignore:reference energies of')
@pytest.mark.filterwarnings('ignore:database')
def test_ethanol_template_recipe_runs_and_exports(shared_data, tmp_path):
    """input_templates/ethanol_methods.yaml's --method mf as it is (real
    ethanol data, cut to 16 structures per database and one epoch per stage):
    a PBE-only stage, then the MF stage with the shared layers frozen and no
    soft coupling; its CCSD(T) head exported as a plain model gives sevenn's
    own calculator our energies and forces."""
    import subprocess
    import sys

    import torch

    from sevenn_mf import SevenNetMFCalculator
    from sevenn_mf.analysis.methods import read_method_input, run_method
    from sevenn_mf.cli import main as cli_main

    template = REPO / 'input_templates' / 'ethanol_methods.yaml'
    raw = yaml.safe_load(template.read_text())
    raw['train'].update(epoch=1)
    del raw['train']['min_epoch_length']  # 200 draws per epoch: too slow here
    for db in raw['data']['databases']:
        db['files'] = str((template.parent / db['files']).resolve())
        db['reader'] = {'index': ':16'}
    raw['train']['delta']['paired_files'] = str(
        (template.parent / raw['train']['delta']['paired_files']).resolve()
    )
    path = tmp_path / 'ethanol.yaml'
    path.write_text(yaml.safe_dump(raw))
    res = run_method(
        read_method_input(str(path)), 'mf', str(tmp_path / 'run'), screen=False
    )
    assert [st.name for st in res.stages] == ['lf', 'mf']
    cfg = torch.load(res.stages[-1].checkpoint, weights_only=False)['config']
    assert cfg.get('freeze_shared') is True and not cfg.get('coupling')
    assert cfg.get('ema_decay') == pytest.approx(0.99)

    ckpt, fid = res.parts[0]
    assert fid == 'ccsdt'
    plain = tmp_path / 'ccsdt.pth'
    assert cli_main(['export', ckpt, '--fidelity', 'ccsdt', '-o', str(plain)]) == 0
    mol = read(shared_data / 'ethanol' / 'hf_test_dev_ccsdt.extxyz', '0')
    mol.write(tmp_path / 'mol.extxyz')
    code = (
        'import json, warnings; warnings.filterwarnings("ignore")\n'
        'from ase.io import read\n'
        'from sevenn.calculator import SevenNetCalculator\n'
        f'a = read({str(tmp_path / "mol.extxyz")!r})\n'
        f'a.calc = SevenNetCalculator({str(plain)!r}, device="cpu")\n'
        'print(json.dumps([a.get_potential_energy(), a.get_forces().tolist()]))\n'
    )
    e, f = json.loads(
        subprocess.run(
            [sys.executable, '-c', code], check=True, capture_output=True, text=True
        ).stdout
    )
    mol.calc = SevenNetMFCalculator(ckpt, fidelity='ccsdt')
    assert e == pytest.approx(mol.get_potential_energy(), abs=1e-5)
    assert np.abs(np.array(f) - mol.get_forces()).max() < 1e-5


def test_mf_stage_with_frozen_shared_layers(tmp_path):
    """``train.mf.freeze_shared`` freezes the shared layers in the
    multi-fidelity stage only: every shared weight of its model is the LF
    model's exactly while the fidelity-dependent ones moved, the LF stage
    trained everything; without ``init: lf`` it is refused up front."""
    import torch

    from sevenn_mf.analysis.methods import (
        MethodError,
        read_method_input,
        run_method,
    )
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.model import fidelity_parameter_names

    path = _methods_yaml(
        tmp_path, epochs=2, mf={'init': 'lf', 'freeze_shared': True}
    )
    mi = read_method_input(str(path))
    res = run_method(
        mi, 'mf', str(tmp_path / 'mf'), screen=False, shared_dir=str(tmp_path / 's')
    )
    cfg = {
        s.name: torch.load(s.checkpoint, weights_only=False)['config']
        for s in res.stages
    }
    assert cfg['mf'].get('freeze_shared') is True
    assert not cfg['lf'].get('freeze_shared')
    lf_sd = torch.load(res.stages[0].checkpoint, weights_only=False)[
        'model_state_dict'
    ]
    mf_sd = torch.load(res.stages[1].checkpoint, weights_only=False)[
        'model_state_dict'
    ]
    model = Checkpoint(res.stages[1].checkpoint).build_model()
    fid = set(fidelity_parameter_names(model))
    shared = [
        k
        for k in mf_sd
        if k in lf_sd and k not in fid and mf_sd[k].shape == lf_sd[k].shape
    ]
    assert any('weight_nn' in k for k in shared)  # every convolution's radial net
    for k in shared:
        assert torch.equal(mf_sd[k], lf_sd[k]), k
    # onehot layers: [shared input rows; one row per fidelity] flattened; the
    # conversion to two fidelities rescales the shared rows by one factor (the
    # fan-in normalisation), which they keep, while the PBE row trained on
    mixed = [k for k in fid if k.endswith('linear.weight')]
    assert mixed
    moved = 0
    for k in mixed:
        out = mf_sd[k].numel() - lf_sd[k].numel()
        n = lf_sd[k].numel() - out
        ratio = mf_sd[k][:n] / lf_sd[k][:n]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5), k
        moved += not torch.allclose(mf_sd[k][n : n + out], ratio[0] * lf_sd[k][n:])
    assert moved

    for bad, match in (
        ({'freeze_shared': True}, 'needs train.mf.init: lf'),
        ({'init': 'lf', 'freeze_shared': 'yes'}, 'must be true or false'),
    ):
        with pytest.raises(MethodError, match=match):
            read_method_input(str(_methods_yaml(tmp_path, mf=bad)))


def test_mf_from_lf_with_fidelity_radial_networks(tmp_path):
    """``model.fidelity_radial`` reaches the multi-fidelity stage only: the
    shared LF stage is built without it (its fingerprint does not change with
    the MF recipe), the MF stage starts from the LF model with zero radial
    deltas and trains the r2SCAN rows, and its folded r2SCAN fidelity is a
    plain SevenNet model."""
    import torch
    import yaml

    from sevenn_mf.analysis.methods import read_method_input, run_method
    from sevenn_mf.checkpoint import Checkpoint
    from sevenn_mf.model import fidelity_radial_nets, fold

    path = _methods_yaml(
        tmp_path,
        mf={'init': 'lf', 'lr': 0.001},
        coupling={'anchor': 'pbe', 'parameter': 1.0},
    )
    raw = yaml.safe_load(path.read_text())
    raw['model']['fidelity_radial'] = True
    raw['model']['fidelity_layer_mode'] = 'indexed'
    path.write_text(yaml.safe_dump(raw))
    mi = read_method_input(str(path))
    res = run_method(
        mi, 'mf', str(tmp_path / 'mf'), screen=False, shared_dir=str(tmp_path / 's')
    )
    stages = {s.name: s.checkpoint for s in res.stages}
    lf = torch.load(stages['lf'], weights_only=False)
    assert not lf['config'].get('fidelity_radial')
    assert not any('weight_nn.delta' in k for k in lf['model_state_dict'])
    cp = Checkpoint(stages['mf'])
    assert cp.config['fidelity_radial']
    model = cp.build_model()
    nets = fidelity_radial_nets(model)
    assert len(nets) == 1
    r2 = cp.config['_modal_map']['r2scan']
    assert all(n.delta_weight[r2].abs().max() > 0 for n in nets.values())
    plain, pcfg = fold(model, cp.config, 'r2scan')
    assert not fidelity_radial_nets(plain) and 'fidelity_radial' not in pcfg


def test_gpu_run_sets_the_device_at_training_time(tmp_path, monkeypatch):
    """scripts/gpu_run.py: every training of the wrapped script gets
    ``device: cuda``, set as it starts (run_stage has fingerprinted the
    stage's YAML by then, so reused stages stay reused)."""
    import runpy
    import sys

    import sevenn_mf.train as T

    seen = []
    monkeypatch.setattr(
        T, 'train', lambda config, *a, **k: seen.append(dict(config))
    )
    script = tmp_path / 'run.py'
    script.write_text(
        'import sevenn_mf.train as T\n'
        "raw = {'device': 'cpu', 'epoch': 3}\n"
        "T.train(raw, 'wd')\n"
    )
    gpu_run = runpy.run_path(
        str(Path(__file__).resolve().parents[1] / 'scripts' / 'gpu_run.py'),
        run_name='gpu_run',
    )
    monkeypatch.setattr(sys, 'argv', ['gpu_run.py', str(script)])
    gpu_run['main']()
    assert seen == [{'device': 'cuda', 'epoch': 3}]

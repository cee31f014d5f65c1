"""MD stability check (sevenn_mf.analysis.md_check) and choosing what to
label next by the fidelity gap (sevenn_mf.analysis.selection)."""

import csv

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.io import read, write

from sevenn_mf.analysis.md_check import MDSettings, md_check, summary_table
from sevenn_mf.analysis.selection import (
    Candidate,
    random_pick,
    read_candidates,
    select,
    write_chosen,
)
from sevenn_mf.gap import GapRange


def _cu(n=2):
    return bulk('Cu', 'fcc', a=3.61, cubic=True) * (n, n, n)


class Collapse(Calculator):
    """A purely attractive pair potential: atoms fall onto each other."""

    # no repulsion at all: a cluster falls together in a few tens of fs

    implemented_properties = ['energy', 'forces']

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        from ase.neighborlist import neighbor_list

        i, j, d, D = neighbor_list('ijdD', self.atoms, 4.0)
        e = -2.0 * np.exp(-(d**2) / 4.0)
        f_pair = (-e * d / 2.0)[:, None] * D / d[:, None]  # dE/dd > 0: towards j
        forces = np.zeros((len(self.atoms), 3))
        np.add.at(forces, i, f_pair)
        self.results = {'energy': 0.5 * e.sum(), 'forces': forces}


class Heater(EMT):
    """EMT plus an anti-friction force (+gamma m v, per ASE time unit): pumps
    energy in faster than the thermostat (friction 0.1 per ASE time) removes it."""

    gamma = 5.0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        v = self.atoms.get_velocities()
        m = self.atoms.get_masses()[:, None]
        self.results['forces'] = self.results['forces'] + self.gamma * m * v


class Inconsistent(Heater):
    """A weak velocity-dependent force: forces that are not minus the
    gradient of the energy. The thermostat hides it; NVE shows the drift."""

    gamma = 0.03


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_stable_emt_and_outputs(tmp_path):
    s = MDSettings(temperature=300, steps=120, nve_steps=60, seeds=(1, 2))
    out = md_check(EMT, [_cu()], s, str(tmp_path), labels=['cu'], log=lambda m: None)
    assert [t.stable for t in out] == [True, True]
    for t in out:
        rows = _rows(t.steps_csv)
        assert len(rows) == 180 and rows[-1]['phase'] == 'nve'
        assert abs(t.drift_ev_atom) < 1e-3
        temps = [float(r['temperature']) for r in rows[60:120]]
        assert (
            100 < np.mean(temps) < 450
        )  # equipartition halves it, the thermostat heats
        assert len(read(t.frames, ':')) == 18  # every 10 steps
    assert (tmp_path / 'summary.csv').exists() and (
        tmp_path / 'md_check.png'
    ).exists()
    assert 'stable: 2/2' in summary_table(out, s)


def test_deterministic_with_a_seed(tmp_path):
    s = MDSettings(temperature=500, steps=40, nve_steps=0, seeds=(3,))
    a = md_check(EMT, [_cu()], s, str(tmp_path / 'a'), log=lambda m: None)[0]
    b = md_check(EMT, [_cu()], s, str(tmp_path / 'b'), log=lambda m: None)[0]
    assert _rows(a.steps_csv) == _rows(b.steps_csv)
    c = md_check(
        EMT,
        [_cu()],
        MDSettings(temperature=500, steps=40, nve_steps=0, seeds=(4,)),
        str(tmp_path / 'c'),
        log=lambda m: None,
    )[0]
    assert _rows(c.steps_csv) != _rows(a.steps_csv)


@pytest.mark.parametrize(
    'calc,kind',
    [
        (Collapse, 'collapse'),
        (Heater, 'temperature'),
        (Inconsistent, 'energy drift'),
    ],
)
def test_failures_are_detected(tmp_path, calc, kind):
    from ase import Atoms

    if calc is Collapse:  # a small cluster in vacuum
        atoms = Atoms(
            'Cu4', positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]]
        )
    else:
        atoms = _cu()
        atoms.rattle(0.05, seed=1)
    s = MDSettings(
        temperature=300,
        steps=300,
        nve_steps=200,
        seeds=(1,),
        max_drift=0.005,
        max_force=1e4,
        max_temperature_factor=1e6 if calc is Collapse else 3.0,
    )
    t = md_check(calc, [atoms], s, str(tmp_path), log=lambda m: None)[0]
    assert not t.stable and t.failure == kind, (t.failure, t.detail)
    rows = _rows(t.steps_csv)
    assert int(rows[-1]['step']) == t.failure_step
    assert t.failure_ps == pytest.approx(t.failure_step * 0.5 / 1000)
    if kind == 'energy drift':
        assert t.failure_step == 500  # judged at the end of the NVE segment
    else:
        assert t.failure_step < 300
    # the failing configuration is kept
    assert read(t.frames, -1).info['step'] == t.failure_step


def test_molecule_losing_an_atom(tmp_path):
    from ase import Atoms

    class Repel(Calculator):
        implemented_properties = ['energy', 'forces']

        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            f = np.zeros((len(self.atoms), 3))
            f[0] = [-5.0, 0, 0]  # one atom is pushed away
            self.results = {'energy': 5.0 * self.atoms.positions[0, 0], 'forces': f}

    mol = Atoms('H2O', positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    s = MDSettings(
        temperature=100,
        steps=2000,
        nve_steps=0,
        seeds=(1,),
        max_temperature_factor=1e6,
    )
    t = md_check(Repel, [mol], s, str(tmp_path), log=lambda m: None)[0]
    assert t.failure == 'atom left'


def test_gap_along_a_multi_fidelity_trajectory(tmp_path):
    from sevenn_mf import SevenNetMFCalculator

    cell = read('input_templates/quickstart_data/r2scan_test_x0.5.extxyz', 0)
    s = MDSettings(
        temperature=600,
        steps=10,
        nve_steps=0,
        seeds=(1,),
        gap_every=5,
        write_every=5,
    )
    t = md_check(
        lambda: SevenNetMFCalculator('7net-mf-0', 'R2SCAN'),
        [cell],
        s,
        str(tmp_path),
        log=lambda m: None,
    )[0]
    rows = _rows(t.steps_csv)
    sampled = [int(r['step']) for r in rows if r.get('gap_PBE_energy_meV')]
    assert sampled == [1, 5, 10]  # the first step, then every gap_every
    assert t.n_gap == 3 and np.isfinite(t.max_gap_energy)


# ---- selection -------------------------------------------------------------
def _trajectory_candidates(tmp_path, n=60):
    frames = []
    base = _cu()
    rng = np.random.default_rng(0)
    for i in range(n):
        a = base.copy()
        a.positions += rng.normal(0, 0.02 + 0.002 * i, a.positions.shape)
        frames.append(a)
    write(tmp_path / 'traj.extxyz', frames)
    cands = read_candidates([str(tmp_path / 'traj.extxyz')])
    for c in cands:  # a known score: rising along the trajectory
        c.score = float(c.frame)
        c.gaps = {'pbe': (0.001 * c.frame, 0.01)}
    return cands


def test_selection_takes_the_highest_gaps_kept_apart(tmp_path):
    cands = _trajectory_candidates(tmp_path)
    chosen = select(cands, 5, seed=1, min_separation=4, diversity=0.0)
    frames = [c.frame for c in chosen]
    assert frames == [59, 55, 51, 47, 43]  # the top, 4 frames apart
    assert select(cands, 5, seed=1, min_separation=4, diversity=0.0) == chosen
    path = write_chosen(chosen, str(tmp_path / 'chosen.extxyz'))
    back = read(path, ':')
    assert [a.info['source_frame'] for a in back] == frames
    assert back[0].info['gap_score'] == 59.0 and back[0].calc is None  # unlabelled


def test_selection_diversity_rule(tmp_path):
    cands = _trajectory_candidates(tmp_path)
    twin = Candidate(
        cands[-1].atoms.copy(),
        'other.extxyz',
        0,
        score=100.0,
        gaps={'pbe': (0.1, 0.01)},
    )
    chosen = select(cands + [twin], 3, seed=1, min_separation=1, diversity=0.3)
    # the duplicate of frame 59 scores highest, frame 59 itself is then too close
    assert chosen[0] is twin and 59 not in [c.frame for c in chosen if c is not twin]
    assert len(chosen) == 3


def test_random_control_is_seeded(tmp_path):
    cands = _trajectory_candidates(tmp_path)
    a = [c.frame for c in random_pick(cands, 6, seed=2)]
    assert a == [c.frame for c in random_pick(cands, 6, seed=2)]
    assert a != [c.frame for c in random_pick(cands, 6, seed=3)]
    assert len(set(a)) == 6


def test_gap_score_against_the_training_range():
    r = GapRange(
        'r2scan',
        {
            'pbe': {
                'n': 10,
                'energy_min': 0.0,
                'energy_max': 0.02,
                'energy_mean': 0.01,
                'energy_sd': 0.005,
                'force_max': 0.2,
                'force_mean': 0.1,
                'force_sd': 0.02,
            }
        },
    )
    assert r.score('pbe', 0.01, 0.1) == pytest.approx(0.0)
    assert r.score('pbe', 0.03, 0.1) == pytest.approx(4.0)  # 4 energy sds
    assert r.score('pbe', 0.01, 0.2) == pytest.approx(5.0)  # 5 force sds
    assert not r.outside('pbe', 0.015, 0.15) and r.outside('pbe', 0.03, 0.1)


def test_cli_md_check_select_and_compare(tmp_path, capsys):
    from lammps_utils import find_lmp

    from sevenn_mf.cli import main

    cell = 'input_templates/quickstart_data/r2scan_test_x0.5.extxyz'
    args = [
        'md-check',
        '7net-mf-0',
        '--fidelity',
        'R2SCAN',
        '--structures',
        cell,
        '--index',
        '0',
        '-T',
        '800',
        '--steps',
        '20',
        '--nve-steps',
        '5',
        '--seeds',
        '1',
        '--write-every',
        '2',
        '--gap-every',
        '2',
    ]
    assert main(args + ['-o', str(tmp_path / 'md')]) == 0
    out = capsys.readouterr().out
    assert 'stable: 1/1' in out and (tmp_path / 'md' / 'md_check.png').exists()
    frames = str(tmp_path / 'md' / 'r2scan_test_x0.5_0_s1.extxyz')
    assert (
        main(
            [
                'select',
                '7net-mf-0',
                frames,
                '--fidelity',
                'R2SCAN',
                '-k',
                '2',
                '--min-separation',
                '3',
                '-o',
                str(tmp_path / 'chosen.extxyz'),
            ]
        )
        == 0
    )
    chosen = read(tmp_path / 'chosen.extxyz', ':')
    assert len(chosen) == 2
    assert abs(chosen[0].info['source_frame'] - chosen[1].info['source_frame']) >= 3
    assert chosen[0].info['gap_score'] >= chosen[1].info['gap_score']
    assert (
        main(
            [
                'compare',
                '7net-mf-0',
                '--fidelity',
                'R2SCAN',
                '--files',
                cell,
                '-o',
                str(tmp_path / 'cmp'),
            ]
        )
        == 0
    )
    assert (tmp_path / 'cmp' / 'compare.png').exists()
    lmp = find_lmp()
    if lmp is None:
        pytest.skip('no LAMMPS binary: bash scripts/build_lammps.sh --serial')
    assert main(args + ['-o', str(tmp_path / 'mdl'), '--lammps', str(lmp)]) == 0
    assert 'stable: 1/1' in capsys.readouterr().out

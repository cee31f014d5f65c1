"""Does a potential stay stable in molecular dynamics at a temperature?

``md_check`` runs Langevin NVT (ASE) from each given structure with several
seeds, then a short NVE segment, and watches every step for the ways a bad
potential fails:

* ``collapse``: two atoms closer than ``min_distance`` (Å);
* ``force``: a force larger than ``max_force`` (eV/Å);
* ``temperature``: the temperature, averaged over 20 steps, above
  ``max_temperature_factor`` times the target;
* ``atom left``: an atom farther than ``isolated`` Å from every other atom
  (molecules; off for periodic cells);
* ``non-finite``: a NaN or infinite energy or force;
* ``energy drift``: in the NVE segment, the total energy moves by more than
  ``max_drift`` eV/atom.

For a multi-fidelity model (a :class:`~sevenn_mf.calculator.SevenNetMFCalculator`)
the fidelity gap of the chosen head to the others is recorded every
``gap_every`` steps along the trajectory (:mod:`sevenn_mf.gap`), with whether
it is outside the range seen on the high-fidelity training structures: a
trajectory that wanders where the model extrapolates shows it before it fails.

Outputs in ``out_dir``: ``summary.csv`` (one row per trajectory),
``<label>_s<seed>.csv`` (every step), ``<label>_s<seed>.extxyz`` (frames
every ``write_every`` steps, the last one too; input for
:mod:`sevenn_mf.analysis.selection`) and ``md_check.png``. The LAMMPS variant
(``lammps=...``) runs the same protocol through ``pair_style e3gnn`` and reads
the same quantities from LAMMPS' thermo output (no gap: one fidelity is
deployed).
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

FAILURES = (
    'collapse',
    'force',
    'temperature',
    'atom left',
    'non-finite',
    'energy drift',
)


@dataclass
class MDSettings:
    temperature: float  # K
    steps: int = 500  # NVT steps
    timestep: float = 0.5  # fs
    friction: float = 0.01  # 1/fs (ASE Langevin)
    seeds: Sequence[int] = (1, 2)
    nve_steps: int = 100
    min_distance: float = 0.6
    max_force: float = 25.0
    max_temperature_factor: float = 3.0
    isolated: Optional[float] = 4.0  # ignored for periodic cells
    max_drift: float = 0.02  # eV/atom over the NVE segment
    gap_every: int = 10
    write_every: int = 10

    def check(self) -> None:
        for name in (
            'temperature',
            'timestep',
            'friction',
            'min_distance',
            'max_force',
            'max_temperature_factor',
            'max_drift',
        ):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(
                    f'md-check: {name} must be a positive number, got {v!r}'
                )
        for name in ('steps', 'gap_every', 'write_every'):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(
                    f'md-check: {name} must be an integer >= 1, got {v!r}'
                )
        if not isinstance(self.nve_steps, int) or self.nve_steps < 0:
            raise ValueError(
                f'md-check: nve_steps must be >= 0, got {self.nve_steps!r}'
            )
        if not self.seeds:
            raise ValueError('md-check: give at least one seed')


@dataclass
class Trajectory:
    label: str
    seed: int
    stable: bool
    failure: Optional[str] = None
    failure_step: Optional[int] = None
    failure_ps: Optional[float] = None
    steps_run: int = 0
    drift_ev_atom: float = float('nan')
    max_gap_energy: float = float('nan')  # meV/atom, |gap| of the chosen head
    max_gap_force: float = float('nan')  # meV/Å
    # the largest distance from the training gaps, in training sds (GapRange.score)
    max_gap_score: float = float('nan')
    n_outside: int = 0  # gap samples outside the training range
    n_gap: int = 0
    frames: str = ''
    steps_csv: str = ''
    detail: str = ''


class _Failure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


# ---- the checks --------------------------------------------------------------
def _distances(atoms, cutoff: float):
    """(min pair distance, max nearest-neighbour distance or None)."""
    if atoms.pbc.any():
        from ase.neighborlist import neighbor_list

        try:
            from matscipy.neighbours import neighbour_list as nl

            d = (
                nl('d', atoms, cutoff)
                if atoms.pbc.all()
                else neighbor_list('d', atoms, cutoff)
            )
        except ImportError:
            d = neighbor_list('d', atoms, cutoff)
        return (float(d.min()) if len(d) else cutoff), None
    pos = atoms.positions
    dm = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    np.fill_diagonal(dm, np.inf)
    nearest = dm.min(axis=1)
    return float(nearest.min()), float(nearest.max()) if len(nearest) > 1 else None


class _Watch:
    """Per-step observer: records the step and raises :class:`_Failure`."""

    def __init__(
        self,
        atoms,
        s: MDSettings,
        rows: List[Dict[str, Any]],
        gap_calc,
        frames: List[Any],
        offset: int = 0,
        phase: str = 'nvt',
    ) -> None:
        self.atoms, self.s, self.rows = atoms, s, rows
        self.gap_calc, self.frames = gap_calc, frames
        self.step, self.offset, self.phase = 0, offset, phase
        self.temps: deque = deque(maxlen=20)
        self.dyn = None

    def __call__(self) -> None:
        if self.dyn is not None and self.dyn.nsteps == 0:
            return  # ASE also calls observers before the first step
        a, s = self.atoms, self.s
        self.step += 1
        step = self.offset + self.step
        epot = a.get_potential_energy()
        forces = a.get_forces()
        temp = a.get_temperature()
        row = {
            'step': step,
            'time_fs': step * s.timestep,
            'phase': self.phase,
            'temperature': temp,
            'epot': epot,
            'etot': epot + a.get_kinetic_energy(),
        }
        gap = getattr(a.calc, 'results', {}).get('fidelity_gap')
        if gap:
            for other, g in gap.items():
                row[f'gap_{other}_energy_meV'] = 1000 * g['energy']
                row[f'gap_{other}_force_meV'] = 1000 * g['force']
            row['gap_outside'] = a.calc.results.get('fidelity_gap_outside')
            rng = getattr(a.calc, 'gap_range', None)
            if rng is not None and rng.reference == getattr(
                a.calc, 'fidelity', None
            ):
                row['gap_score'] = max(
                    rng.score(o, g['energy'], g['force'])
                    for o, g in gap.items()
                    if o in rng.ranges
                )
        self.temps.append(temp)
        if not (np.isfinite(epot) and np.isfinite(forces).all()):
            self._fail(row, 'non-finite', 'non-finite energy or forces')
        fmax = float(np.linalg.norm(forces, axis=1).max())
        dmin, dnear = _distances(a, max(s.min_distance * 2, 1.0))
        row.update(min_distance=dmin, max_force=fmax)
        self.rows.append(row)
        if self.gap_calc is not None:  # gap on the next step, every gap_every
            self.gap_calc.gap = (self.step + 1) % s.gap_every == 0
        if self.step % s.write_every == 0:
            self._frame(row)
        if dmin < s.min_distance:
            self._fail(row, 'collapse', f'atoms {dmin:.2f} Å apart')
        if fmax > s.max_force:
            self._fail(row, 'force', f'force of {fmax:.1f} eV/Å')
        if len(self.temps) == self.temps.maxlen and (
            np.mean(self.temps) > s.max_temperature_factor * s.temperature
        ):
            self._fail(
                row, 'temperature', f'{np.mean(self.temps):.0f} K over 20 steps'
            )
        if s.isolated and dnear is not None and dnear > s.isolated:
            self._fail(row, 'atom left', f'an atom {dnear:.1f} Å from the others')

    def _frame(self, row) -> None:
        f = self.atoms.copy()
        f.calc = None
        f.info.update(
            {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
        )
        self.frames.append(f)

    def _fail(self, row, kind: str, detail: str) -> None:
        self._frame(row)
        raise _Failure(kind, detail)


def _gap_stats(rows: List[Dict[str, Any]], t: Trajectory) -> None:
    e = [abs(v) for r in rows for k, v in r.items() if k.endswith('_energy_meV')]
    f = [v for r in rows for k, v in r.items() if k.endswith('_force_meV')]
    flags = [r['gap_outside'] for r in rows if r.get('gap_outside') is not None]
    if e:
        t.max_gap_energy, t.max_gap_force = float(max(e)), float(max(f))
    scores = [r['gap_score'] for r in rows if r.get('gap_score') is not None]
    if scores:
        t.max_gap_score = float(max(scores))
    t.n_gap, t.n_outside = len(flags), int(sum(bool(x) for x in flags))


# ---- one trajectory, ASE -----------------------------------------------------
def run_trajectory(
    atoms,
    calc,
    s: MDSettings,
    seed: int,
    label: str,
    out_dir: str,
    progress: bool = False,
) -> Trajectory:
    from ase import units
    from ase.io import write
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet
    from tqdm import tqdm

    a = atoms.copy()
    a.calc = calc
    gap_calc = (
        calc if hasattr(calc, 'gap') and getattr(calc, 'fidelities', None) else None
    )
    gap_wanted = gap_calc is not None and len(gap_calc.fidelities) > 1
    if gap_calc is not None:
        gap_calc.gap = gap_wanted  # the first step has a gap sample
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(a, temperature_K=s.temperature, rng=rng)
    Stationary(a)
    rows: List[Dict[str, Any]] = []
    frames: List[Any] = []
    t = Trajectory(label, seed, True)
    bar = tqdm(
        total=s.steps + s.nve_steps,
        desc=f'{label} s{seed}',
        disable=not progress,
        leave=False,
    )
    watch = _Watch(a, s, rows, gap_calc if gap_wanted else None, frames)
    try:
        dyn = Langevin(
            a,
            s.timestep * units.fs,
            temperature_K=s.temperature,
            friction=s.friction / units.fs,
            rng=rng,
        )
        watch.dyn = dyn
        dyn.attach(watch, interval=1)
        dyn.attach(lambda: bar.update(1), interval=1)
        dyn.run(s.steps)
        if s.nve_steps:
            e0 = a.get_potential_energy() + a.get_kinetic_energy()
            nve = _Watch(
                a, s, rows, watch.gap_calc, frames, offset=s.steps, phase='nve'
            )
            nve.temps = watch.temps
            dyn = VelocityVerlet(a, s.timestep * units.fs)
            nve.dyn = dyn
            dyn.attach(nve, interval=1)
            dyn.attach(lambda: bar.update(1), interval=1)
            dyn.run(s.nve_steps)
            t.drift_ev_atom = float(
                (a.get_potential_energy() + a.get_kinetic_energy() - e0) / len(a)
            )
            if abs(t.drift_ev_atom) > s.max_drift:
                raise _Failure(
                    'energy drift',
                    f'total energy moved {1000 * t.drift_ev_atom:+.1f} '
                    f'meV/atom in {s.nve_steps} NVE steps',
                )
        if not frames or frames[-1].info.get('step') != rows[-1]['step']:
            watch._frame(rows[-1])
    except _Failure as exc:
        t.stable = False
        t.failure, t.detail = exc.kind, exc.detail
        t.failure_step = rows[-1]['step'] if rows else 0
        t.failure_ps = t.failure_step * s.timestep / 1000
    finally:
        bar.close()
        if gap_calc is not None:
            gap_calc.gap = gap_wanted
    t.steps_run = rows[-1]['step'] if rows else 0
    _gap_stats(rows, t)
    base = os.path.join(out_dir, f'{_safe(label)}_s{seed}')
    t.steps_csv, t.frames = base + '.csv', base + '.extxyz'
    _write_rows(t.steps_csv, rows)
    write(t.frames, frames, format='extxyz')
    return t


def _safe(label: str) -> str:
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in label)


def _write_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


# ---- all of them ---------------------------------------------------------------
def md_check(
    calc_factory: Callable[[], Any],
    structures: Sequence[Any],
    settings: MDSettings,
    out_dir: str,
    labels: Optional[Sequence[str]] = None,
    log: Callable[[str], None] = print,
) -> List[Trajectory]:
    """Run every structure with every seed; write the outputs; return one
    :class:`Trajectory` per run. ``calc_factory()`` gives a fresh ASE
    calculator (one per trajectory: no state leaks between them)."""
    settings.check()
    os.makedirs(out_dir, exist_ok=True)
    labels = list(labels or [f'structure{i}' for i in range(len(structures))])
    progress = sys.stderr.isatty()
    out = []
    for atoms, label in zip(structures, labels):
        for seed in settings.seeds:
            t = run_trajectory(
                atoms, calc_factory(), settings, seed, label, out_dir, progress
            )
            out.append(t)
            log(
                f'{label} seed {seed}: '
                + (
                    'stable'
                    if t.stable
                    else f'{t.failure} at step {t.failure_step} ({t.failure_ps:.3f} ps): {t.detail}'
                )
            )
    write_summary(out, settings, out_dir)
    plot(out, settings, os.path.join(out_dir, 'md_check.png'))
    return out


def write_summary(trajs: Sequence[Trajectory], s: MDSettings, out_dir: str) -> str:
    path = os.path.join(out_dir, 'summary.csv')
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(
            f, fieldnames=list(asdict(trajs[0])) if trajs else ['label']
        )
        w.writeheader()
        for t in trajs:
            w.writerow(asdict(t))
    return path


def summary_table(trajs: Sequence[Trajectory], s: MDSettings) -> str:
    rows = [
        f'MD check at {s.temperature:g} K: {s.steps} NVT + {s.nve_steps} NVE steps '
        f'of {s.timestep:g} fs ({(s.steps + s.nve_steps) * s.timestep / 1000:g} ps)',
        f'{"structure":<24}{"seed":>5}  {"result":<34}{"max gap score":>14}'
        f'{"outside range":>15}',
    ]
    for t in trajs:
        res = 'stable' if t.stable else f'{t.failure} at {t.failure_ps:.3f} ps'
        gap = f'{t.max_gap_score:.1f}' if np.isfinite(t.max_gap_score) else '-'
        out = f'{t.n_outside}/{t.n_gap}' if t.n_gap else '-'
        rows.append(f'{t.label:<24}{t.seed:>5}  {res:<34}{gap:>14}{out:>15}')
    n = len(trajs)
    stable = sum(t.stable for t in trajs)
    failed = [t.failure_ps for t in trajs if not t.stable]
    if any(t.n_gap for t in trajs):
        rows.append(
            'gap score: distance of the fidelity gap from its range on the '
            'high-fidelity training structures, in their standard deviations'
        )
    rows.append(
        f'stable: {stable}/{n}'
        + (
            f'; failures at {np.mean(failed):.3f} ps on average (first {min(failed):.3f} ps)'
            if failed
            else ''
        )
    )
    return '\n'.join(rows)


def plot(trajs: Sequence[Trajectory], s: MDSettings, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    if not trajs:
        return None
    has_gap = any(t.n_gap for t in trajs)
    n = 3 + has_gap
    fig, axes = plt.subplots(n, 1, figsize=(7, 2.2 * n), sharex=True)
    for t in trajs:
        with open(t.steps_csv) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        time = np.array([float(r['time_fs']) for r in rows]) / 1000
        (line,) = axes[0].plot(
            time,
            [float(r['temperature']) for r in rows],
            lw=0.8,
            label=f'{t.label} s{t.seed}',
        )
        axes[1].plot(
            time,
            [float(r['min_distance']) for r in rows],
            lw=0.8,
            color=line.get_color(),
        )
        axes[2].plot(
            time,
            [float(r['max_force']) for r in rows],
            lw=0.8,
            color=line.get_color(),
        )
        if has_gap:
            cols = [k for k in rows[0] if k.endswith('_energy_meV')]
            for c in cols[:1]:
                pts = [(tt, float(r[c])) for tt, r in zip(time, rows) if r.get(c)]
                if pts:
                    axes[3].plot(
                        *zip(*pts), '.-', ms=2, lw=0.6, color=line.get_color()
                    )
        if not t.stable:
            for ax in axes:
                ax.axvline(t.failure_ps, color=line.get_color(), ls=':', lw=0.8)
    axes[0].axhline(s.temperature, color='k', lw=0.5)
    axes[0].set_ylabel('T (K)')
    axes[1].axhline(s.min_distance, color='r', lw=0.5)
    axes[1].set_ylabel('min distance (Å)')
    axes[2].set_ylabel('max |F| (eV/Å)')
    if has_gap:
        axes[3].set_ylabel('energy gap\n(meV/atom)')
    axes[-1].set_xlabel('time (ps)')
    if len(trajs) <= 12 and axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- LAMMPS --------------------------------------------------------------------
def lammps_trajectory(
    deployed: str,
    atoms,
    s: MDSettings,
    seed: int,
    label: str,
    out_dir: str,
    lmp: str,
) -> Trajectory:
    """The same protocol with ``pair_style e3gnn`` (Langevin + NVE, then NVE),
    judged on LAMMPS' per-step thermo output."""
    import subprocess

    from ase.io import write

    base = os.path.join(out_dir, f'{_safe(label)}_s{seed}_lammps')
    os.makedirs(base, exist_ok=True)
    a = atoms.copy()
    if not a.pbc.any():  # LAMMPS needs a box: vacuum around a molecule
        a.center(vacuum=10.0)
    a.pbc = True
    elements = sorted(set(a.get_chemical_symbols()))
    write(
        os.path.join(base, 'data.lmp'),
        a,
        format='lammps-data',
        specorder=elements,
        masses=True,
    )
    damp = 1.0 / s.friction  # fs
    script = f"""units metal
boundary p p p
atom_style atomic
read_data data.lmp
pair_style e3gnn
pair_coeff * * {os.path.abspath(deployed)} {' '.join(elements)}
timestep {s.timestep / 1000}
velocity all create {s.temperature} {seed} dist gaussian mom yes
compute pd all pair/local dist
compute dmin all reduce min c_pd inputs local
variable fa atom sqrt(fx*fx+fy*fy+fz*fz)
compute fmax all reduce max v_fa
thermo_style custom step temp pe etotal c_dmin c_fmax
thermo_modify norm no flush yes lost warn
thermo 1
fix lang all langevin {s.temperature} {s.temperature} {damp / 1000} {seed}
fix integ all nve
run {s.steps}
unfix lang
run {s.nve_steps}
"""
    with open(os.path.join(base, 'in.lmp'), 'w') as f:
        f.write(script)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    res = subprocess.run(
        [lmp, '-in', 'in.lmp', '-log', 'log.lammps', '-screen', 'none'],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
    )
    rows = _thermo_rows(os.path.join(base, 'log.lammps'), s)
    t = Trajectory(label, seed, True, frames='', steps_csv=base + '.csv')
    _write_rows(t.steps_csv, rows)
    n = len(a)
    temps: deque = deque(maxlen=20)
    e0 = None
    for r in rows:
        temps.append(r['temperature'])
        kind = None
        if not (np.isfinite(r['epot']) and np.isfinite(r['max_force'])):
            kind, detail = 'non-finite', 'non-finite energy or forces'
        elif r['min_distance'] < s.min_distance:
            kind, detail = 'collapse', f'atoms {r["min_distance"]:.2f} Å apart'
        elif r['max_force'] > s.max_force:
            kind, detail = 'force', f'force of {r["max_force"]:.1f} eV/Å'
        elif (
            len(temps) == 20
            and np.mean(temps) > s.max_temperature_factor * s.temperature
        ):
            kind, detail = 'temperature', f'{np.mean(temps):.0f} K over 20 steps'
        if r['step'] == s.steps:
            e0 = r['etot']
        if kind:
            t.stable, t.failure, t.detail = False, kind, detail
            t.failure_step = int(r['step'])
            t.failure_ps = t.failure_step * s.timestep / 1000
            break
    if t.stable and rows and e0 is not None and rows[-1]['step'] > s.steps:
        t.drift_ev_atom = (rows[-1]['etot'] - e0) / n
        if abs(t.drift_ev_atom) > s.max_drift:
            t.stable, t.failure = False, 'energy drift'
            t.failure_step = int(rows[-1]['step'])
            t.failure_ps = t.failure_step * s.timestep / 1000
            t.detail = f'total energy moved {1000 * t.drift_ev_atom:+.1f} meV/atom'
    if t.stable and (
        res.returncode != 0 or not rows or rows[-1]['step'] < s.steps + s.nve_steps
    ):
        t.stable, t.failure = False, 'non-finite'
        t.failure_step = int(rows[-1]['step']) if rows else 0
        t.failure_ps = t.failure_step * s.timestep / 1000
        t.detail = 'LAMMPS stopped: ' + (res.stderr or res.stdout).strip()[-200:]
    t.steps_run = int(rows[-1]['step']) if rows else 0
    return t


def _thermo_rows(log: str, s: MDSettings) -> List[Dict[str, Any]]:
    rows, head = [], None
    if not os.path.isfile(log):
        return rows
    with open(log) as f:
        for line in f:
            parts = line.split()
            if parts[:2] == ['Step', 'Temp']:
                head = parts
                continue
            if head and len(parts) == len(head):
                try:
                    v = [float(x) for x in parts]
                except ValueError:
                    head = None
                    continue
                if rows and int(v[0]) <= rows[-1]['step']:
                    continue  # the second run repeats the first's last step
                rows.append(
                    {
                        'step': int(v[0]),
                        'time_fs': v[0] * s.timestep,
                        'temperature': v[1],
                        'epot': v[2],
                        'etot': v[3],
                        'min_distance': v[4],
                        'max_force': v[5],
                    }
                )
            elif head and parts[:1] == ['Loop']:
                head = None
    return rows

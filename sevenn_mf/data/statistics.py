"""What the model takes from the training data before it is built: per-fidelity
element references (the energy shift), the shared force scale and the average
number of neighbours (sevenn's convolution denominator).

They are computed from per-structure *summaries* (:class:`GraphSummary`:
atomic numbers, energy, sum of squared forces, counts), which in-memory graphs
and the on-disk store (:mod:`sevenn_mf.data.store`) both provide, so the two
storages give the same numbers from the same arithmetic without the store
reading a single graph.

Checks across a database's structures live here too: label counts and the
warnings on missing labels, energy-per-atom outliers, validation structures
identical to training ones.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence

import numpy as np
from ase.data import chemical_symbols

from .. import _sevenn as S
from .._sevenn import KEY
from .databases import DatabaseSpec, DataError
from .references import as_univ_list, energy_outliers, fit_reference_energies

SHIFT_FIT = 'elemwise_reference_energies'


class GraphSummary:
    """What the statistics need of one structure. ``numbers``/``energy``/
    ``forces`` make it acceptable to :func:`fit_reference_energies`."""

    __slots__ = (
        'numbers',
        'energy',
        'fsq',
        'fcount',
        'n_edges',
        'n_atoms',
        'stress_ok',
    )
    forces = None

    def __init__(self, numbers, energy, fsq, fcount, n_edges, n_atoms, stress_ok):
        self.numbers = numbers
        self.energy = energy
        self.fsq = fsq
        self.fcount = fcount
        self.n_edges = n_edges
        self.n_atoms = n_atoms
        self.stress_ok = stress_ok


def summary_of(z, energy, force, stress, n_edges, n_atoms) -> GraphSummary:
    # the same arithmetic as references.force_rms / fit_reference_energies on
    # float32 graph tensors
    f = np.asarray(force, dtype=float)
    f = f[~np.isnan(f)]
    return GraphSummary(
        np.asarray(z),
        float(energy),
        float(np.sum(f * f)),
        int(f.size),
        int(n_edges),
        int(n_atoms),
        bool(np.isfinite(stress).all()),
    )


def summarize(graph: Any) -> GraphSummary:
    """Summary of an in-memory sevenn graph."""
    return summary_of(
        graph[KEY.ATOMIC_NUMBERS].detach().cpu().numpy(),
        float(graph[KEY.ENERGY]),
        graph[KEY.FORCE].detach().cpu().numpy(),
        graph[KEY.STRESS].detach().cpu().numpy(),
        graph[KEY.EDGE_IDX].shape[1],
        int(graph[KEY.NUM_ATOMS]),
    )


def force_sq_count(summaries: Sequence[GraphSummary]):
    total, count = 0.0, 0
    for s in summaries:  # same order and partial sums as references.force_rms
        total += s.fsq
        count += s.fcount
    return total, count


class SummarySource(Protocol):
    """What :func:`fill_statistics` reads (``TrainingData`` is one)."""

    @property
    def fidelities(self) -> List[str]: ...

    def summaries(self, fidelity: Any = None) -> List[GraphSummary]: ...


def fill_statistics(
    config: Dict[str, Any], data: SummarySource, log: Callable[[str], None]
) -> None:
    """Per-fidelity element references (shift), shared scale and conv
    denominator, written into ``config`` in sevenn's formats."""
    from ase.data import chemical_symbols

    species = [chemical_symbols[z] for z in config[KEY.TYPE_MAP]]
    user_refs = config.get(S.REFERENCE_ENERGIES) or {}
    unknown = set(user_refs) - set(data.fidelities)
    if unknown:
        raise ValueError(
            f'data.reference_energies names unknown fidelities '
            f'{sorted(unknown)} (fidelities: {data.fidelities})'
        )
    shift = config.get(KEY.SHIFT)
    if isinstance(shift, str):
        if shift != SHIFT_FIT:
            raise ValueError(
                'sevenn_mf fits per-fidelity element references: use '
                f'shift: {SHIFT_FIT}, or give numbers'
            )
        _warn_unfitted_elements(data, species, user_refs)
        refs = {}
        for fid in data.fidelities:
            graphs = data.summaries(fid)
            fitted = fit_reference_energies(graphs, species) if graphs else {}
            fitted = {el: fitted.get(el, 0.0) for el in species}
            fitted.update(
                {k: float(v) for k, v in (user_refs.get(fid) or {}).items()}
            )
            refs[fid] = fitted
            log(
                f'reference energies ({fid}): '
                + ', '.join(f'{el} {e:.4f}' for el, e in fitted.items())
                + ' eV'
            )
        config[KEY.SHIFT] = {fid: as_univ_list(r) for fid, r in refs.items()}
        config[KEY.USE_MODAL_WISE_SHIFT] = True
    summaries = data.summaries()
    scale = config.get(KEY.SCALE)
    if isinstance(scale, str):
        if scale != 'force_rms':
            raise ValueError("scale must be 'force_rms' or a number")
        total, count = force_sq_count(summaries)  # = force_rms(train graphs)
        if count == 0:
            raise DataError(
                'no training structure has force labels: data.scale: force_rms '
                'cannot be computed (give data.scale a number, or set reader: '
                '{force_key: <name>} in a database whose files hold forces under '
                'another name)'
            )
        rms = float(np.sqrt(total / count))
        if not np.isfinite(rms) or rms <= 0:
            rms = 1.0
        config[KEY.SCALE] = float(rms)
        config[KEY.USE_MODAL_WISE_SCALE] = False
    denom = config.get(KEY.CONV_DENOMINATOR)
    if isinstance(denom, str):
        if denom not in ('avg_num_neigh', 'sqrt_avg_num_neigh'):
            raise ValueError(f'conv_denominator {denom!r} is not supported')
        n_edges = sum(s.n_edges for s in summaries)
        n_atoms = sum(s.n_atoms for s in summaries)
        avg = n_edges / max(n_atoms, 1)
        config[KEY.CONV_DENOMINATOR] = float(
            avg if denom == 'avg_num_neigh' else math.sqrt(avg)
        )
    has_stress = any(s.stress_ok for s in summaries)
    if config.get(KEY.IS_TRAIN_STRESS, True) and not has_stress:
        log('no training structure has a stress label: stress is not trained')
        config[KEY.IS_TRAIN_STRESS] = False


def _warn_unfitted_elements(
    data: SummarySource, species: List[str], user_refs: Dict[str, Any]
) -> None:
    """An element with energies at one fidelity but none at another gets a
    reference it was never fitted to at the other: say so."""
    seen: Dict[str, set] = {}
    for fid in data.fidelities:
        zs = [s.numbers for s in data.summaries(fid) if np.isfinite(s.energy)]
        present = np.unique(np.concatenate(zs)) if zs else []
        seen[fid] = {chemical_symbols[int(z)] for z in present}
    for fid in data.fidelities:
        if not seen[fid]:
            continue  # no energies at all: fit_reference_energies says so
        given = set(user_refs.get(fid) or {})
        for el in species:
            others = [f for f in data.fidelities if f != fid and el in seen[f]]
            if el in seen[fid] or el in given or not others:
                continue
            warnings.warn(
                f'element {el} is in the energy-labelled training structures of '
                f"fidelity {', '.join(map(repr, others))} but not of '{fid}': its "
                f"'{fid}' reference energy cannot be fitted and is 0.0 eV (set "
                f'data.reference_energies: {{{fid}: {{{el}: <eV>}}}} to choose it)',
                stacklevel=3,
            )


# ---- checks of a database's structures ------------------------------------------
@dataclass
class LabelCounts:
    """How many structures of a database carry each label, its elements, and
    keys of its files that look like an unread energy or forces label."""

    structures: int = 0
    energy: int = 0
    force: int = 0
    stress: int = 0
    elements: set = field(default_factory=set)
    candidates: Dict[str, List[str]] = field(
        default_factory=lambda: {'energy': [], 'force': []}
    )

    def add(
        self,
        numbers: Iterable[int],
        energy: bool,
        force: bool,
        stress: bool,
        candidates: Optional[Dict[str, List[str]]] = None,
    ) -> None:
        self.structures += 1
        self.energy += bool(energy)
        self.force += bool(force)
        self.stress += bool(stress)
        self.elements.update(int(z) for z in np.unique(np.asarray(numbers)))
        self.add_candidates(candidates)

    def add_candidates(self, candidates: Optional[Dict[str, List[str]]]) -> None:
        for label, keys in (candidates or {}).items():
            known = self.candidates.setdefault(label, [])
            known.extend(k for k in keys if k not in known)

    def add_summaries(self, summaries: Iterable[GraphSummary]) -> None:
        for s in summaries:
            self.add(s.numbers, np.isfinite(s.energy), s.fcount > 0, s.stress_ok)

    def merge(self, other: LabelCounts) -> None:
        self.structures += other.structures
        self.energy += other.energy
        self.force += other.force
        self.stress += other.stress
        self.elements |= other.elements
        self.add_candidates(other.candidates)

    @property
    def species(self) -> str:
        return ' '.join(sorted(chemical_symbols[z] for z in self.elements))


def _files_of(spec: DatabaseSpec) -> str:
    more = len(spec.files) - 1
    return spec.files[0] + (f' and {more} more file(s)' if more > 0 else '')


def label_warnings(counts: Sequence[tuple]) -> List[str]:
    """One line per database that has no energy or no force labels while
    other databases of the run have them, or while its files hold a key that
    looks like that label under another name. ``counts``: (spec,
    :class:`LabelCounts`) per database."""
    out = []
    for label, name, key, other in (
        ('force', 'force', 'force_key', 'energies'),
        ('energy', 'energy', 'energy_key', 'forces'),
    ):
        having = [s.name for s, c in counts if getattr(c, label)]
        for spec, c in counts:
            if getattr(c, label) or not c.structures:
                continue
            others = [n for n in having if n != spec.name]
            found = c.candidates.get(label) or []
            if not others and not found:
                continue
            line = f"database '{spec.name}' ({_files_of(spec)}) has no {name} labels"
            if others:
                many = len(others) > 1
                line += (
                    f' (database{"s" if many else ""} '
                    f'{", ".join(map(repr, others))} {"have" if many else "has"})'
                )
            line += f': it trains on {other} only'
            if found:
                line += (
                    f'; its files hold {", ".join(map(repr, found))}, which looks like '
                    f'{name} labels: set reader: {{{key}: {found[0]}}} in its entry'
                )
            else:
                line += (
                    f'; if its files hold them under another name, set reader: '
                    f'{{{key}: <name>}} in its entry'
                )
            out.append(line)
    return out


def check_energy_outliers(
    spec: DatabaseSpec,
    numbers: Sequence[Any],
    energies: Sequence[float],
    where: Callable[[int], str],
) -> None:
    """Refuse a database whose energies per atom include outliers of its own
    element reference fit (:func:`~sevenn_mf.data.references.energy_outliers`)
    unless its entry allows them; ``where(i)`` names structure ``i``."""
    if spec.allow_outliers:
        return
    idx, residual, threshold = energy_outliers(
        numbers, energies, floor=spec.outlier_threshold
    )
    if not len(idx):
        return
    order = np.argsort(-np.abs(residual))
    i, r = int(idx[order[0]]), float(residual[order[0]])
    n = len(np.asarray(numbers[i]).reshape(-1))
    e = float(energies[i])
    msg = (
        f'{where(i)}: energy {e:.6g} eV ({e / n:.6g} eV/atom) is {abs(r):.3g} '
        f'eV/atom {"above" if r > 0 else "below"} the element-reference fit of '
        f"database '{spec.name}' (outlier threshold {threshold:.3g} eV/atom): a "
        'wrong label or unit?'
    )
    if len(idx) > 1:
        shown = ', '.join(where(int(idx[j])) for j in order[1:4])
        rest = len(idx) - 1 - min(3, len(idx) - 1)
        msg += (
            f' {len(idx) - 1} more such structure(s): {shown}'
            + (f' and {rest} more' if rest else '')
            + ';'
        )
    msg += (
        " set allow_outliers: true (or a larger outlier_threshold) in the database's "
        'entry to train on them'
    )
    raise DataError(msg)


# A stress label is (1/V) dE/de, so its hydrostatic part must match how the
# energy changes with volume between structures of one composition. Labels
# from a code run with another sign convention, or with a broken stress, fit
# against the energies and cost the energy fit (the InGaN PBE pool:
# docs/benchmarks.md, "InGaN stress labels").
STRESS_SLOPE_MIN_FRAMES = 8
STRESS_SLOPE_SIGMAS = 4.0


def stress_slope_mismatch(
    numbers: Sequence[Any],
    energies: Sequence[float],
    volumes: Sequence[float],
    hydrostatic: Sequence[float],
    force_sq: Optional[Sequence[float]] = None,
) -> Optional[Dict[str, float]]:
    """Compare the energies' volume slope with the stress labels.

    Per composition with at least ``STRESS_SLOPE_MIN_FRAMES`` structures and a
    volume spread, the energy per atom is fitted as a + b V/N (+ c |F|^2/N
    when ``force_sq``, the sum of squared forces per atom, is given: it absorbs
    most of the energy of displaced atoms, which is not a volume effect). The
    slopes b are combined by inverse variance, as are the mean hydrostatic
    stresses s = trace(sigma)/3 (ASE sign, eV/A^3: s = dE/dV). Returns the
    numbers when b and s have opposite signs and both are more than
    ``STRESS_SLOPE_SIGMAS`` standard errors from zero, else None.
    """
    groups: Dict[tuple, List[int]] = {}
    for i, z in enumerate(numbers):
        zs, counts = np.unique(np.asarray(z).reshape(-1), return_counts=True)
        groups.setdefault((tuple(zs), tuple(counts)), []).append(i)
    slopes, stresses = [], []
    for idx in groups.values():
        if len(idx) < STRESS_SLOPE_MIN_FRAMES:
            continue
        n = np.array([len(np.asarray(numbers[i]).reshape(-1)) for i in idx], float)
        v = np.asarray([volumes[i] for i in idx], float) / n
        e = np.asarray([energies[i] for i in idx], float) / n
        s = np.asarray([hydrostatic[i] for i in idx], float)
        if v.std() < 1e-3 * abs(v.mean()):
            continue
        cols = [np.ones_like(v), v - v.mean()]
        if force_sq is not None:
            cols.append(np.asarray([force_sq[i] for i in idx], float))
        a = np.stack(cols, axis=1)
        dof = len(idx) - a.shape[1]
        if dof < 2:
            continue
        coef, *_ = np.linalg.lstsq(a, e, rcond=None)
        r = e - a @ coef
        try:
            cov = np.linalg.inv(a.T @ a) * (r @ r / dof)
        except np.linalg.LinAlgError:
            continue
        slopes.append((coef[1], cov[1, 1]))
        stresses.append((s.mean(), s.var(ddof=1) / len(s)))
    if not slopes:
        return None

    def pooled(items):
        w = np.array([1.0 / max(var, 1e-30) for _, var in items])
        x = np.array([m for m, _ in items])
        return float((w * x).sum() / w.sum()), float(np.sqrt(1.0 / w.sum()))

    b, b_se = pooled(slopes)
    s, s_se = pooled(stresses)
    k = STRESS_SLOPE_SIGMAS
    if b * s < 0 and abs(b) > k * b_se and abs(s) > k * s_se:
        return {
            'slope': b,
            'slope_se': b_se,
            'stress': s,
            'stress_se': s_se,
            'compositions': len(slopes),
        }
    return None


def cell_terms(frame: Any) -> Optional[tuple]:
    """(volume, mean stress trace in ASE's sign) of a :class:`Frame` that the
    stress-label check can use: periodic, with energy and stress labels;
    else None. The one definition, for in-memory frames and store summaries."""
    p = frame.present
    if frame.atoms is None or not (p.get('energy') and p.get('stress')):
        return None
    if not all(frame.atoms.pbc):
        return None
    # sevenn stores -sigma (ASE sign) in y_stress
    return float(frame.atoms.get_volume()), -float(np.mean(frame.stress[:3]))


def stress_slope_warning(spec: DatabaseSpec, frames: Sequence[Any]) -> Optional[str]:
    """One line when the stress labels of ``frames`` (:class:`Frame` of one
    database) contradict their energies (:func:`stress_slope_mismatch`);
    frames without energy, stress or a periodic cell are left out. For
    databases whose stress is trained (the caller knows)."""
    use = [(f, t) for f in frames if (t := cell_terms(f)) is not None]
    has_f = bool(use) and all(f.present.get('force') for f, _ in use)
    return stress_slope_line(
        spec,
        [f.numbers for f, _ in use],
        [f.energy for f, _ in use],
        [t[0] for _, t in use],
        [t[1] for _, t in use],
        [float((f.forces**2).sum()) / len(f.atoms) for f, _ in use]
        if has_f
        else None,
    )


def stress_slope_line(
    spec: DatabaseSpec,
    numbers: Sequence[Any],
    energies: Sequence[float],
    volumes: Sequence[float],
    hydrostatic: Sequence[float],
    force_sq: Optional[Sequence[float]] = None,
) -> Optional[str]:
    """The warning of :func:`stress_slope_warning` from the numbers alone
    (periodic structures with energy and stress only): what an on-disk store
    keeps of each structure is enough."""
    if len(numbers) < STRESS_SLOPE_MIN_FRAMES:
        return None
    found = stress_slope_mismatch(numbers, energies, volumes, hydrostatic, force_sq)
    if found is None:
        return None
    rising = found['slope'] > 0
    return (
        f"database '{spec.name}' ({_files_of(spec)}): its stress labels contradict "
        f'its energies: between structures of the same composition the energy per '
        f'atom {"rises" if rising else "falls"} with volume (dE/dV = '
        f'{found["slope"]:+.3g} +- {found["slope_se"]:.2g} eV/A^3 over '
        f'{found["compositions"]} composition(s)), while the stresses say it '
        f'{"falls" if rising else "rises"} (mean trace/3 = '
        f"{found['stress']:+.3g} eV/A^3 in ASE's sign, where it equals dE/dV). "
        'Fitting both costs the energy fit: check the stress sign and units of the '
        'code that wrote them, or set weight: {stress: 0} in its entry'
    )


def leak_pairs(
    train_hashes: Sequence[int], valid_hashes: Sequence[int]
) -> List[tuple]:
    """(validation position, training position) of validation structures
    identical to a training structure (first match)."""
    first: Dict[int, int] = {}
    for k, h in enumerate(train_hashes):
        first.setdefault(int(h), k)
    return [
        (k, first[int(h)]) for k, h in enumerate(valid_hashes) if int(h) in first
    ]

"""What the model takes from the training data before it is built: per-fidelity
element references (the energy shift), the shared force scale and the average
number of neighbours (sevenn's convolution denominator).

They are computed from per-structure *summaries* (:class:`GraphSummary`:
atomic numbers, energy, sum of squared forces, counts), which in-memory graphs
and the on-disk store (:mod:`sevenn_mf.data.store`) both provide, so the two
storages give the same numbers from the same arithmetic without the store
reading a single graph.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Protocol, Sequence

import numpy as np

from .. import _sevenn as S
from .._sevenn import KEY
from .references import as_univ_list, fit_reference_energies

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
            raise ValueError('no force labels: cannot compute a force scale')
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
